import os

import pytest

# Keep tests on 2 cores predictable.
os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture
def cli_runner():
    from click.testing import CliRunner

    return CliRunner()

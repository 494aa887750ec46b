# Two commands do all the set-up on a fresh machine (Python 3.11, no system ffmpeg needed):
#   make demo   create .venv, install, run the embedded demo pipeline on CPU
#   make demo-direction   the same for the eight direction-of-motion classes (longer budgets)
#   make test   create .venv, install with dev extras, run the test suite
# The ffmpeg range (what CI runs after `make test`):
#   make test-ffmpeg-range   the video tests against the oldest supported ffmpeg (4.2.2, from
#                            the imageio-ffmpeg 0.5.1 wheel) and the newest (the bundled one)
#   make test-video FFMPEG=/path/to/ffmpeg   the same against any ffmpeg
#   make sample-videos       Debian's packaged sample videos into a cache, for the slow tests
# TORCH_SPEC picks the torch build; the default is a CPU wheel. GPU users: make TORCH_SPEC=torch
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
CACHE ?= .cache
# The oldest ffmpeg vimpac supports: the static 4.2.2 build inside this PyPI wheel.
OLDEST_FFMPEG_WHEEL ?= imageio-ffmpeg==0.5.1
OLDEST_FFMPEG_PLATFORM ?= manylinux2010_x86_64
OLDEST_FFMPEG := $(CACHE)/ffmpeg-4.2/ffmpeg
# Debian packages that ship sample videos (opencv-doc: OpenCV's vtest.avi, Megamind.avi, ...).
SAMPLE_DEBS ?= opencv-doc
SAMPLE_VIDEOS ?= $(CACHE)/sample-videos
VIDEO_TESTS ?= tests/test_video.py tests/test_torture.py tests/test_real_video.py \
	tests/test_ffmpeg_exe.py
FFMPEG ?=

.PHONY: install demo demo-direction test test-all lint bench clean oldest-ffmpeg sample-videos test-video \
	test-ffmpeg-range

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	# optional: OpenAI's dall_e package, only to test the DALL-E importer (no deps: it would pull torchvision)
	$(BIN)/python -m pip install -q --no-deps "dall-e==0.1" attrs requests urllib3 idna charset-normalizer certifi || echo "dall-e not installed: its import test will be skipped"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/vimpac run demo

demo-direction: $(STAMP)
	$(BIN)/vimpac run demo-direction

test: $(STAMP)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

test-all: $(STAMP)
	$(BIN)/python -m pytest -q -m "" $(PYTEST_ARGS)

# The video tests (slow ones included) against one ffmpeg: FFMPEG=path (empty: PATH or bundled).
test-video: $(STAMP)
	VIMPAC_FFMPEG=$(FFMPEG) VIMPAC_SAMPLE_VIDEOS=$(abspath $(SAMPLE_VIDEOS)) \
	  $(BIN)/python -m pytest -q -m "" $(VIDEO_TESTS) $(PYTEST_ARGS)

test-ffmpeg-range: $(STAMP) $(OLDEST_FFMPEG)
	$(MAKE) test-video FFMPEG=$(abspath $(OLDEST_FFMPEG))
	$(MAKE) test-video FFMPEG=$$($(BIN)/python -c "import imageio_ffmpeg as m; print(m.get_ffmpeg_exe())")

oldest-ffmpeg: $(OLDEST_FFMPEG)

# pip download (no install) of the wheel, then only its ffmpeg binary is kept.
$(OLDEST_FFMPEG): | $(STAMP)
	rm -rf $(@D).partial && mkdir -p $(@D).partial
	$(BIN)/python -m pip download -q --no-deps --only-binary=:all: \
	  --platform $(OLDEST_FFMPEG_PLATFORM) -d $(@D).partial "$(OLDEST_FFMPEG_WHEEL)"
	$(BIN)/python -m zipfile -e $(@D).partial/*.whl $(@D).partial/wheel
	chmod +x $(@D).partial/wheel/imageio_ffmpeg/binaries/ffmpeg-linux64-v4.2.2
	mkdir -p $(@D)
	mv $(@D).partial/wheel/imageio_ffmpeg/binaries/ffmpeg-linux64-v4.2.2 $@
	rm -rf $(@D).partial

sample-videos: $(SAMPLE_VIDEOS)/SOURCES.txt

$(SAMPLE_VIDEOS)/SOURCES.txt:
	bash tests/fetch_sample_videos.sh $(SAMPLE_VIDEOS) $(SAMPLE_DEBS)

lint: $(STAMP)
	$(BIN)/ruff check .

bench: $(STAMP)
	$(BIN)/python -m benchmarks --scale small

clean:
	rm -rf $(VENV) .pytest_cache

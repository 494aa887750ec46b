"""Import the authors' released pre-trained weights (the official ``classifier.pt``).

The paper's authors published ``small``, ``large`` (128 px) and ``large`` (256 px) as
``snap/<run>/classifier.pt``: ``torch.save`` of their ``ModelWithHead.state_dict()`` (backbone,
masked-token head, contrastive projection head), next to an ``args.pickle`` that this importer
never opens (unpickling runs code). Everything is read off the tensors of a
``torch.load(weights_only=True)``:

- vocabulary ``K + 5`` and width ``d`` from ``backbone.embedding.weight``; the grid ``T x H x W``
  from the three factorised position tables (``hw_separation``, the released models' setting);
- layers from ``transformer.resblocks.<i>``; the layout from how many attentions each of a
  layer's attention blocks holds (``[1, 2]`` is ``T,H|W``), as the official layouts differ in
  exactly that; the attention width (halved or not) from the q/k/v rows, the MLP width from
  ``mlp.c_fc``; the projection head's depth and widths from ``cls_head.mlp.linear_<i>``;
- the number of heads is the one thing the tensors cannot tell: the official code always uses
  ``hid_dim // 64`` (small 8, large 16), which is the default; an ``args.txt`` beside the file
  that names ``heads`` (read as JSON or a Python literal, never executed) or ``heads=`` overrides
  it for checkpoints made with other code. ``hid_dim`` / ``layers`` in that ``args.txt`` must
  agree with the tensors.

Keys are renamed to ours (:data:`RENAMES`), separate q/k/v projections are stacked into our fused
``qkv`` (rows ``[q; k; v]``, each split into heads the same way), the decoder tied to the
embedding is checked and dropped, and :func:`import_official` writes ``pretrained.pt`` (backbone and
both heads, :mod:`vimpac.pretrain.export`) with a provenance record (source sha256, inferred
shape) and the tokenizer fingerprint of the DALL-E import the weights were trained on, plus the
same record as ``import.json``. A file that is not such a checkpoint (another state dict, a
truncated file, tensors of the wrong shape, a pickle that would run code) is refused with a
:class:`CheckpointError` naming the file and what is wrong.
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import json
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from vimpac.common.checkpoint import CheckpointError, load_checkpoint
from vimpac.common.storage import atomic_open
from vimpac.pretrain.export import save_pretrained
from vimpac.pretrain.model import PRESETS, ModelConfig, VimpacPretrainModel

log = logging.getLogger(__name__)

SOURCE_FORMAT = "official VIMPAC classifier.pt (ModelWithHead.state_dict())"
HEAD_DIM_RULE = "hid_dim // 64 (the official code's rule)"
POS = "backbone.positional_embedding."
BLOCK = r"backbone\.transformer\.resblocks\.(\d+)\.attention_blocks\.(\d+)"
QKV = re.compile(BLOCK + r"\.attentions\.(\d+)\.attention\.(query|key|value)\.(weight|bias)")
PROJ_LINEAR = re.compile(r"cls_head\.mlp\.linear_(\d+)\.weight")

# The official layouts (``--model efflayout...``), told apart by attentions per block.
LAYOUTS: dict[tuple[int, ...], str] = {
    (1,): "T", (1, 1): "T,H", (1, 1, 1): "T,H,W", (1, 2): "T,H|W", (3,): "T|H|W", (2, 1): "H|W,T",
}


def _proj_index(match: re.Match[str], offset: int) -> str:
    """Official projection layer i -> our Sequential index (Linear 3i, BatchNorm 3i + 1)."""
    return str(3 * int(match.group(1)) + offset)


# Official key (full match) -> our key (a template, or a function of the match).
RENAMES: list[tuple[re.Pattern[str], str | Callable[[re.Match[str]], str]]] = [
    (re.compile(p), t) for p, t in (
        (r"backbone\.embedding\.weight", "backbone.token_embed.weight"),
        (r"backbone\.cls_param", "backbone.cls_param"),
        (POS.replace(".", r"\.") + r"temporal_pos_embedding", "backbone.pos_t"),
        (POS.replace(".", r"\.") + r"height_pos_embedding", "backbone.pos_h"),
        (POS.replace(".", r"\.") + r"width_pos_embedding", "backbone.pos_w"),
        (POS.replace(".", r"\.") + r"cls_pos_embedding", "backbone.pos_cls"),
        (r"backbone\.ln_pre\.(weight|bias)", r"backbone.embed_ln.\1"),
        (BLOCK + r"\.output\.dense\.(weight|bias)", r"backbone.layers.\1.attention.\2.dense.\3"),
        (BLOCK + r"\.output\.LayerNorm\.(weight|bias)", r"backbone.layers.\1.attention.\2.ln.\3"),
        (r"backbone\.transformer\.resblocks\.(\d+)\.mlp\.c_fc\.(weight|bias)",
         r"backbone.layers.\1.mlp.fc1.\2"),
        (r"backbone\.transformer\.resblocks\.(\d+)\.mlp\.c_proj\.(weight|bias)",
         r"backbone.layers.\1.mlp.fc2.\2"),
        (r"backbone\.transformer\.resblocks\.(\d+)\.ln\.(weight|bias)",
         r"backbone.layers.\1.mlp.ln.\2"),
        (r"mlm_head\.transform\.0\.(weight|bias)", r"mlm_head.dense.\1"),
        (r"mlm_head\.transform\.2\.(weight|bias)", r"mlm_head.ln.\1"),
        (r"mlm_head\.bias", "mlm_head.bias"),
    )
] + [
    (re.compile(r"cls_head\.mlp\.linear_(\d+)\.(weight|bias)"),
     lambda m: f"contrastive_head.mlp.{_proj_index(m, 0)}.{m.group(2)}"),
    (re.compile(r"cls_head\.mlp\.bn_(\d+)\.(weight|bias|running_mean|running_var|"
                r"num_batches_tracked)"),
     lambda m: f"contrastive_head.mlp.{_proj_index(m, 1)}.{m.group(2)}"),
]
TIED = ("mlm_head.decoder.weight", "mlm_head.decoder.bias")  # checked, then dropped


@dataclass(frozen=True)
class Inferred:
    """What the tensors say about the checkpoint's model."""
    config: ModelConfig
    proj_layers: int
    proj_hidden: int
    proj_dim: int
    heads_rule: str

    def preset(self) -> str | None:
        """The vimpac preset of the same backbone (grid and vocabulary aside), if any."""
        mine = dataclasses.replace(self.config, frames=5, height=16, width=16,
                                   codebook_size=8192, dropout=0.1)
        return next((name for name, preset in PRESETS.items() if preset == mine), None)

    def record(self) -> dict[str, Any]:
        c = self.config
        return {"preset": self.preset(), "layers": c.layers, "dim": c.dim, "heads": c.heads,
                "heads_rule": self.heads_rule, "attention_dim": c.attention_dim,
                "mlp_dim": c.mlp_dim, "layout": c.layout, "frames": c.frames,
                "grid": [c.height, c.width], "frame_size_px": 8 * c.height,
                "codebook_size": c.codebook_size, "proj_layers": self.proj_layers,
                "proj_hidden": self.proj_hidden, "proj_dim": self.proj_dim}


# ------------------------------------------------------------------------------------------ read

def read_official(path: str | Path) -> dict[str, Tensor]:
    """The state dict of an official ``classifier.pt`` (tensors only, ``module.`` stripped)."""
    state = load_checkpoint(path)  # weights_only: a pickle that would run code is refused here
    if not isinstance(state, dict) or not state or not all(
            isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items()):
        hint = (" (a vimpac file: it needs no import)" if isinstance(state, dict)
                and "format" in state else "")
        raise CheckpointError(f"{path}: not an official VIMPAC classifier.pt: expected a state "
                              f"dict of tensors{hint}")
    if all(k.startswith("module.") for k in state):  # saved from the DDP wrapper
        state = {k[len("module."):]: v for k, v in state.items()}
    if "backbone.embedding.weight" not in state:
        raise CheckpointError(f"{path}: not an official VIMPAC classifier.pt: no "
                              f"backbone.embedding.weight (keys: {', '.join(sorted(state)[:4])}"
                              f"{', ...' if len(state) > 4 else ''})")
    return state


def _shape(state: dict[str, Tensor], key: str, dims: int, path: str | Path) -> tuple[int, ...]:
    if key not in state:
        raise CheckpointError(f"{path}: not an official VIMPAC classifier.pt: missing {key}")
    if state[key].dim() != dims:
        raise CheckpointError(f"{path}: {key} has shape {tuple(state[key].shape)}, expected "
                              f"{dims} dimensions")
    return tuple(state[key].shape)


def _structure(state: dict[str, Tensor], path: str | Path) -> dict[int, dict[int, int]]:
    """layer -> attention block -> number of attentions (from the query weights)."""
    found: dict[int, dict[int, set[int]]] = {}
    for key in state:
        if (m := QKV.fullmatch(key)) and m.group(4) == "query" and m.group(5) == "weight":
            layer, block, branch = int(m.group(1)), int(m.group(2)), int(m.group(3))
            found.setdefault(layer, {}).setdefault(block, set()).add(branch)
    if not found or sorted(found) != list(range(len(found))):
        raise CheckpointError(f"{path}: transformer layers {sorted(found)}: expected 0..n-1")
    for layer, blocks in found.items():
        numbered = [sorted(blocks)] + [sorted(branches) for branches in blocks.values()]
        if any(ids != list(range(len(ids))) for ids in numbered):
            raise CheckpointError(f"{path}: layer {layer}: attention blocks / attentions not "
                                  "numbered 0..n-1")
    return {layer: {b: len(branches) for b, branches in blocks.items()}
            for layer, blocks in found.items()}


def _layout(structure: dict[int, dict[int, int]], path: str | Path) -> str:
    shapes = {tuple(blocks[b] for b in sorted(blocks)) for blocks in structure.values()}
    if len(shapes) != 1:
        raise CheckpointError(f"{path}: layers differ in their attention blocks {sorted(shapes)}")
    (shape,) = shapes
    if shape not in LAYOUTS:
        raise CheckpointError(f"{path}: attention blocks {list(shape)} match no official layout "
                              f"({', '.join(LAYOUTS.values())})")
    return LAYOUTS[shape]


def _check_positions(state: dict[str, Tensor], path: str | Path) -> None:
    if POS + "positional_embedding" in state or POS + "spatial_pos_embedding" in state:
        raise CheckpointError(f"{path}: position embedding other than hw_separation (the "
                              "released models' factorised T + H + W tables): not supported")
    if "backbone.ln_post.weight" in state or "backbone.ln_pre.weight" not in state:
        raise CheckpointError(f"{path}: a pre-activation (pre-LN) model: only the post-LN "
                              "models the authors released are supported")


def _projection(state: dict[str, Tensor], dim: int, path: str | Path) -> tuple[int, int, int]:
    """(layers, hidden width, output width) of the contrastive projection head."""
    layers = sorted(int(m.group(1)) for k in state if (m := PROJ_LINEAR.fullmatch(k)))
    if not layers or layers != list(range(len(layers))):
        raise CheckpointError(f"{path}: no contrastive projection head (cls_head.mlp.linear_*): "
                              "only checkpoints with both heads, as released, are imported")
    last = len(layers) - 1
    if f"cls_head.mlp.bn_{last}.weight" in state:
        raise CheckpointError(f"{path}: a batch norm after the last projection layer "
                              "(--nce-bn-after-proj) is not supported")
    out_dim = _shape(state, f"cls_head.mlp.linear_{last}.weight", 2, path)[0]
    hidden = _shape(state, "cls_head.mlp.linear_0.weight", 2, path)[0] if last else 0
    return len(layers), hidden, out_dim


ARGS_TXT_MAX = 1 << 20  # bytes of args.txt read


def read_args_txt(src: Path) -> dict[str, Any]:
    """The settings in ``args.txt`` beside ``src`` (JSON, or the official pprint of a dict read
    with ``ast.literal_eval``, which evaluates no code); {} when there is none."""
    path = src.with_name("args.txt")
    if not path.is_file():
        return {}
    text = path.read_bytes()[:ARGS_TXT_MAX].decode("utf-8", errors="replace")
    try:
        args = json.loads(text)
    except ValueError:
        try:
            args = ast.literal_eval(text)
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            raise CheckpointError(f"{path}: neither JSON nor a Python dict literal (move it "
                                  "away to import without it)") from None
    if not isinstance(args, dict):
        raise CheckpointError(f"{path}: expected a mapping of settings")
    return args


def check_args_txt(args: dict[str, Any], state: dict[str, Tensor], src: Path) -> None:
    """``hid_dim`` and ``layers`` of ``args.txt`` must be what the tensors say."""
    dim = _shape(state, "backbone.embedding.weight", 2, src)[1]
    for key, value in (("hid_dim", dim), ("layers", len(_structure(state, src)))):
        if key in args and args[key] != value:
            raise CheckpointError(f"{src.with_name('args.txt')}: {key} = {args[key]!r}, but "
                                  f"{src.name}'s tensors say {value}: not the same run")


def args_heads(args: dict[str, Any], src: Path) -> int | None:
    heads = args.get("heads")
    if heads is None:
        return None
    if not isinstance(heads, int) or isinstance(heads, bool) or heads < 1:
        raise CheckpointError(f"{src.with_name('args.txt')}: heads = {heads!r}: expected a "
                              "positive integer")
    return heads


def infer(state: dict[str, Tensor], path: str | Path, heads: int | None = None,
          rule: str | None = None) -> Inferred:
    """The model of an official state dict, read off its tensor shapes (see the module doc)."""
    vocab, dim = _shape(state, "backbone.embedding.weight", 2, path)
    if vocab < 6:
        raise CheckpointError(f"{path}: embedding of {vocab} rows: expected codes + 5 special ids")
    _check_positions(state, path)
    frames, height, width = (_shape(state, POS + f"{axis}_pos_embedding", 2, path)[0]
                             for axis in ("temporal", "height", "width"))
    structure = _structure(state, path)
    layout = _layout(structure, path)
    first = "backbone.transformer.resblocks.0.attention_blocks.0.attentions.{}.attention"
    att_dim = sum(_shape(state, first.format(b) + ".query.weight", 2, path)[0]
                  for b in range(structure[0][0]))
    mlp_dim = _shape(state, "backbone.transformer.resblocks.0.mlp.c_fc.weight", 2, path)[0]
    rule = HEAD_DIM_RULE if heads is None else rule or "given (--heads)"
    heads = max(1, dim // 64) if heads is None else heads
    try:
        config = ModelConfig(codebook_size=vocab - 5, layers=len(structure), dim=dim, heads=heads,
                             mlp_dim=mlp_dim, att_dim=None if att_dim == dim else att_dim,
                             frames=frames, height=height, width=width, layout=layout)
    except ValueError as exc:
        raise CheckpointError(f"{path}: {exc} (heads: {rule}; pass --heads)") from None
    return Inferred(config, *_projection(state, dim, path), heads_rule=rule)


# --------------------------------------------------------------------------------------- convert

def _rename(key: str) -> str | None:
    for pattern, target in RENAMES:
        if m := pattern.fullmatch(key):
            return target(m) if callable(target) else m.expand(target)
    return None


def _fused_qkv(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Separate q/k/v projections -> our ``qkv`` Linear (rows ``[q; k; v]``)."""
    parts: dict[tuple[str, str, str, str], dict[str, Tensor]] = {}
    for key, value in state.items():
        if m := QKV.fullmatch(key):
            layer, block, branch, which, kind = m.groups()
            parts.setdefault((layer, block, branch, kind), {})[which] = value
    fused = {}
    for (layer, block, branch, kind), qkv in parts.items():
        if set(qkv) != {"query", "key", "value"}:
            raise KeyError(f"layer {layer} block {block} attention {branch}: {kind} of "
                           f"{sorted(qkv)} only")
        if len({tuple(t.shape) for t in qkv.values()}) != 1:
            raise KeyError(f"layer {layer} block {block} attention {branch}: query, key and "
                           f"value {kind}s of shapes {[tuple(t.shape) for t in qkv.values()]}")
        fused[f"backbone.layers.{layer}.attention.{block}.branches.{branch}.qkv.{kind}"] = \
            torch.cat([qkv["query"], qkv["key"], qkv["value"]], dim=0)
    return fused


def _check_tied(state: dict[str, Tensor], path: str | Path) -> None:
    decoder, bias = state.get(TIED[0]), state.get(TIED[1])
    if decoder is None or not torch.equal(decoder, state["backbone.embedding.weight"]):
        raise CheckpointError(f"{path}: mlm_head.decoder.weight is missing or not tied to "
                              "backbone.embedding.weight, as the official model ties them")
    own = state.get("mlm_head.bias")
    if bias is not None and (own is None or not torch.equal(bias, own)):
        raise CheckpointError(f"{path}: mlm_head.decoder.bias differs from mlm_head.bias")


def convert(state: dict[str, Tensor], path: str | Path, heads: int | None = None,
            rule: str | None = None) -> tuple[VimpacPretrainModel, Inferred]:
    """The official weights as our :class:`VimpacPretrainModel` (eval mode) and what was read."""
    inferred = infer(state, path, heads, rule)
    _check_tied(state, path)
    ours: dict[str, Tensor] = {}
    for key, value in state.items():
        if key in TIED or QKV.fullmatch(key):
            continue
        target = _rename(key)
        if target is None:
            raise CheckpointError(f"{path}: unexpected key {key} (not the official layout)")
        ours[target] = value.reshape(-1) if target == "backbone.pos_cls" else value
    try:
        ours.update(_fused_qkv(state))
    except KeyError as exc:
        raise CheckpointError(f"{path}: attention weights that do not fit: {exc.args[0]}") \
            from None
    model = VimpacPretrainModel(inferred.config, proj_hidden=inferred.proj_hidden or 1,
                                proj_layers=inferred.proj_layers, proj_dim=inferred.proj_dim)
    expected = model.state_dict()
    ours["mlm_head.decoder_weight"] = ours["backbone.token_embed.weight"]
    _check_shapes(ours, expected, inferred, path)
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in ours.items()}, strict=True)
    return model.eval(), inferred


def _check_shapes(ours: dict[str, Tensor], expected: dict[str, Tensor], inferred: Inferred,
                  path: str | Path) -> None:
    missing = sorted(set(expected) - set(ours))
    if missing:
        raise CheckpointError(f"{path}: missing weights for {', '.join(missing[:4])} of a model "
                              f"inferred as {inferred.record()}")
    for key, value in ours.items():
        if key not in expected or tuple(value.shape) != tuple(expected[key].shape):
            want = tuple(expected[key].shape) if key in expected else "no such weight"
            raise CheckpointError(f"{path}: weights for {key} have shape {tuple(value.shape)}, "
                                  f"expected {want} (a model inferred as {inferred.record()})")


# ---------------------------------------------------------------------------------------- import

def sha256_of(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def import_official(src: str | Path, out_dir: str | Path, *, tokenizer_fingerprint: str,
                    tokenizer_codebook: int | None = None,
                    heads: int | None = None) -> dict[str, Any]:
    """Convert an official ``classifier.pt`` into ``out_dir/pretrained.pt`` (+ ``import.json``).

    ``tokenizer_fingerprint`` / ``tokenizer_codebook``: of the DALL-E tokenizer whose tokens the
    weights were trained on (:func:`vimpac.tokenize.tokenizer.dalle_folder`); fine-tuning checks
    archives against the fingerprint. ``heads``: see the module doc. Returns the provenance record.
    """
    src, out = Path(src), Path(out_dir)
    state = read_official(src)
    args = read_args_txt(src)
    check_args_txt(args, state, src)
    rule = None
    if heads is None and (heads := args_heads(args, src)) is not None:
        rule = "args.txt beside the file"
    model, inferred = convert(state, src, heads, rule)
    c = inferred.config
    if tokenizer_codebook is not None and tokenizer_codebook != c.codebook_size:
        raise CheckpointError(f"{src}: a model of {c.codebook_size} codes, but the tokenizer "
                              f"has {tokenizer_codebook}")
    provenance = {"source": str(src.resolve()), "sha256": sha256_of(src),
                  "bytes": src.stat().st_size, "source_format": SOURCE_FORMAT,
                  "inferred": inferred.record(),
                  "conversion": "keys renamed; q/k/v stacked into qkv; tied decoder dropped",
                  "imported_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    pretrain_config = {"model": inferred.preset() or "custom", "frames": c.frames,
                       "grid": c.height, "proj_hidden": inferred.proj_hidden,
                       "proj_layers": inferred.proj_layers, "source": "official"}
    out.mkdir(parents=True, exist_ok=True)
    save_pretrained(out / "pretrained.pt", model, tokenizer_fingerprint=tokenizer_fingerprint,
                    step=0, pretrain_config=pretrain_config, provenance=provenance)
    with atomic_open(out / "import.json") as fh:
        fh.write((json.dumps({**provenance, "tokenizer_fingerprint": tokenizer_fingerprint},
                             indent=1) + "\n").encode())
    log.info("imported %s (%s) -> %s", src, inferred.record(), out / "pretrained.pt")
    return provenance

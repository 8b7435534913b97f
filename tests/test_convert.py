"""The converter: weight layouts, key maps, architecture inference, bad inputs and the CLI."""

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import flax.linen as nn
import jax
import numpy as np
import pytest

from sam_reference import build_small_hf_sam, build_small_sam, import_segment_anything

torch = pytest.importorskip("torch")
jax.config.update("jax_default_matmul_precision", "highest")

from radsam_jax import load_checkpoint  # noqa: E402
from radsam_jax.checkpoint import tree_shapes  # noqa: E402
from radsam_jax.convert import cli  # noqa: E402
from radsam_jax.convert.convert import ConversionError, StateDict, convert_checkpoint, map_state_dict  # noqa: E402
from radsam_jax.convert.infer_arch import infer_config  # noqa: E402
from radsam_jax.convert.key_maps import CONV, CONV_TRANSPOSE, KEY_MAPS, LINEAR  # noqa: E402
from radsam_jax.model import abstract_variables, load_model_config  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _in_memory(state: dict) -> StateDict:
    return StateDict(Path("memory.pth"), "memory", list(state), lambda k: tuple(state[k].shape), lambda k: state[k].float().numpy())


# --------------------------------------------------------------------------- layouts


def test_conv_transpose_kernel_layout_matches_torch():
    """PyTorch ConvTranspose2d (in, out, kh, kw) -> (kh, kw, out, in) + transpose_kernel=True is exact."""
    rng = np.random.default_rng(0)
    w = rng.normal(size=(6, 4, 2, 2)).astype(np.float32)  # (in, out, kh, kw)
    b = rng.normal(size=(4,)).astype(np.float32)
    x = rng.normal(size=(2, 6, 5, 7)).astype(np.float32)  # NCHW, non-square
    expected = torch.nn.functional.conv_transpose2d(torch.from_numpy(x), torch.from_numpy(w), torch.from_numpy(b), stride=2).numpy()
    layer = nn.ConvTranspose(4, (2, 2), strides=(2, 2), padding="VALID", transpose_kernel=True)
    actual = layer.apply({"params": {"kernel": CONV_TRANSPOSE(w), "bias": b}}, x.transpose(0, 2, 3, 1))
    np.testing.assert_allclose(np.asarray(actual).transpose(0, 3, 1, 2), expected, rtol=1e-5, atol=1e-5)
    # The naive reading without transpose_kernel is wrong, so the test would notice a layout slip.
    naive = nn.ConvTranspose(4, (2, 2), strides=(2, 2), padding="VALID").apply(
        {"params": {"kernel": w.transpose(2, 3, 0, 1), "bias": b}}, x.transpose(0, 2, 3, 1)
    )
    assert not np.allclose(np.asarray(naive).transpose(0, 3, 1, 2), expected, atol=1e-3)


def test_conv_and_linear_layouts_match_torch():
    rng = np.random.default_rng(1)
    w = rng.normal(size=(5, 3, 3, 3)).astype(np.float32)  # (out, in, kh, kw)
    x = rng.normal(size=(1, 3, 8, 9)).astype(np.float32)
    expected = torch.nn.functional.conv2d(torch.from_numpy(x), torch.from_numpy(w), padding=1).numpy()
    conv = nn.Conv(5, (3, 3), padding=((1, 1), (1, 1)), use_bias=False)
    actual = conv.apply({"params": {"kernel": CONV(w)}}, x.transpose(0, 2, 3, 1))
    np.testing.assert_allclose(np.asarray(actual).transpose(0, 3, 1, 2), expected, rtol=1e-5, atol=1e-5)
    lw = rng.normal(size=(7, 4)).astype(np.float32)  # (out, in)
    v = rng.normal(size=(2, 4)).astype(np.float32)
    np.testing.assert_allclose(v @ LINEAR(lw), torch.nn.functional.linear(torch.from_numpy(v), torch.from_numpy(lw)).numpy(), rtol=1e-5)


# --------------------------------------------------------------------------- key maps


@pytest.mark.parametrize("fmt", ["segment_anything", "hf"])
def test_every_key_matches_exactly_one_rule_and_fills_the_model(fmt):
    import re

    ref = build_small_sam() if fmt == "segment_anything" else build_small_hf_sam()
    state = ref.state_dict()
    for key in state:
        hits = [r.pattern for r in KEY_MAPS[fmt] if re.fullmatch(r.pattern, key)]
        assert len(hits) == 1, f"{key} matches {hits}"
    mapped = map_state_dict(_in_memory(state), fmt)
    assert not mapped.unmatched and not mapped.problems
    config = infer_config({k: v.shape for k, v in mapped.arrays.items()})
    assert {k: v.shape for k, v in mapped.arrays.items()} == tree_shapes(abstract_variables(config))


def test_hf_tied_positional_embedding_copies_must_agree():
    state = build_small_hf_sam().state_dict()
    state["prompt_encoder.shared_embedding.positional_embedding"] = state["shared_image_embedding.positional_embedding"] + 1
    mapped = map_state_dict(_in_memory(state), "hf")
    assert any("tied copies" in p for p in mapped.problems)


# --------------------------------------------------------------------------- architecture inference


@pytest.mark.parametrize("preset", ["vit_b", "vit_l", "vit_h", "small"])
def test_infer_config_recovers_presets(preset):
    config = load_model_config(preset)
    assert infer_config(tree_shapes(abstract_variables(config))) == config


def test_infer_config_sam_architecture_at_256():
    """ViT-B widths trained at 256x256: window 14 over a 16x16 grid, global tables of length 31."""
    import dataclasses

    config = dataclasses.replace(load_model_config("vit_b"), name="custom", image_size=256)
    inferred = infer_config(tree_shapes(abstract_variables(config)))
    assert inferred == config and inferred.window_size == 14 and inferred.global_attn_indexes == (2, 5, 8, 11)


# --------------------------------------------------------------------------- conversion details


@pytest.fixture(scope="module")
def small_pth(tmp_path_factory):
    sam = build_small_sam()
    path = tmp_path_factory.mktemp("src") / "small.pth"
    torch.save(sam.state_dict(), path)
    return path


def test_wrapped_state_dict_and_pixel_buffers(tmp_path, small_pth):
    state = torch.load(small_pth, weights_only=True)
    state = {f"module.{k}": v for k, v in state.items()}
    state["module.pixel_mean"] = torch.tensor([0.5, 0.5, 0.5]).view(3, 1, 1)
    state["module.pixel_std"] = torch.tensor([58.395, 57.12, 57.375]).view(3, 1, 1)
    src = tmp_path / "wrapped.pt"
    torch.save({"model": state, "epoch": 3}, src)
    model = convert_checkpoint(src, tmp_path / "out")
    assert model.config.pixel_mean == (0.5, 0.5, 0.5)
    assert model.config.pixel_std == load_model_config("vit_b").pixel_std
    assert model.metadata["ignored_keys"]["pixel_mean"] == [0.5, 0.5, 0.5]


def _same_weights(a, b) -> None:
    for (path, x), (_, y) in zip(jax.tree_util.tree_flatten_with_path(a.variables)[0], jax.tree_util.tree_flatten_with_path(b.variables)[0]):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))


def test_prefixed_keys_and_training_script_extras_convert(tmp_path, small_pth):
    """A Lightning .ckpt (state_dict of a module holding SAM as self.model), a "sam." prefix, and a
    checkpoint dict beside a numpy score and argparse options: the same weights as the plain file."""
    import argparse

    plain = convert_checkpoint(small_pth, tmp_path / "plain")
    state = torch.load(small_pth, weights_only=True)
    lightning = tmp_path / "epoch=3.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in state.items()}, "epoch": 3, "global_step": 120}, lightning)
    _same_weights(convert_checkpoint(lightning, tmp_path / "lightning"), plain)
    prefixed = tmp_path / "sam_prefix.pth"
    torch.save({f"sam.{k}": v for k, v in state.items()}, prefixed)
    _same_weights(convert_checkpoint(prefixed, tmp_path / "prefixed"), plain)
    extras = tmp_path / "medsam_style.pth"
    torch.save({"model": state, "best_dice": np.float64(0.91), "args": argparse.Namespace(lr=1e-4, epochs=100)}, extras)
    _same_weights(convert_checkpoint(extras, tmp_path / "extras"), plain)
    two = tmp_path / "teacher_student.pth"
    torch.save({**{f"teacher.{k}": v for k, v in state.items()}, **{f"student.{k}": v for k, v in state.items()}}, two)
    with pytest.raises(ConversionError, match=r"image encoders under several prefixes \('student\.', 'teacher\.'\)"):
        convert_checkpoint(two, tmp_path / "two")


def test_unsafe_pickles_are_refused_naming_the_global(tmp_path, small_pth):
    import fractions

    src = tmp_path / "pickled.pth"
    torch.save({"model": torch.load(small_pth, weights_only=True), "ratio": fractions.Fraction(1, 3)}, src)
    with pytest.raises(ConversionError) as info:
        convert_checkpoint(src, tmp_path / "out")
    message = str(info.value)
    assert "(UnpicklingError: Unsupported global: GLOBAL fractions.Fraction was not an allowed global by default)" in message
    assert "re-save its state dict" in message
    assert "\x1b" not in message and not (tmp_path / "out").exists()


def test_a_checkpoint_missing_blocks_of_a_preset_is_refused_unless_custom(tmp_path):
    """Truncated or partial: SAM "small" widths without its last encoder block would otherwise convert
    to a 5-block model."""
    preset = load_model_config("small")
    sam = build_small_sam(dim=preset.encoder_dim, depth=preset.encoder_depth, heads=preset.encoder_heads,
                          window=preset.window_size, global_attn=preset.global_attn_indexes,
                          prompt_dim=preset.prompt_embed_dim, decoder_mlp=preset.decoder_mlp_dim)
    state = sam.state_dict()
    assert convert_checkpoint(_saved(state, tmp_path / "whole.pth"), tmp_path / "whole").config.name == "small"
    partial = _saved({k: v for k, v in state.items() if not k.startswith("image_encoder.blocks.5.")}, tmp_path / "partial.pth")
    with pytest.raises(ConversionError) as info:
        convert_checkpoint(partial, tmp_path / "out")
    message = str(info.value)
    assert "does not match model 'small'" in message and "image_encoder/blocks_5/attn/qkv/kernel" in message
    assert "Its widths are small's, but it lacks some of its blocks or layers" in message and "--model custom" in message
    custom = convert_checkpoint(partial, tmp_path / "custom", model="custom")
    assert (custom.config.name, custom.config.encoder_depth) == ("custom", 5)
    # Complete, but other in what no key is missing for: converted as the custom model it is.
    four_heads = convert_checkpoint(tmp_path / "whole.pth", tmp_path / "four_heads", decoder_heads=4)
    assert (four_heads.config.name, four_heads.config.decoder_heads) == ("custom", 4)
    wider = build_small_sam(dim=preset.encoder_dim, depth=preset.encoder_depth, heads=preset.encoder_heads,
                            window=preset.window_size, global_attn=preset.global_attn_indexes,
                            prompt_dim=preset.prompt_embed_dim, decoder_mlp=256)
    converted = convert_checkpoint(_saved(wider.state_dict(), tmp_path / "wider.pth"), tmp_path / "wider")
    assert (converted.config.name, converted.config.decoder_mlp_dim) == ("custom", 256)
    no_decoder = _saved({k: v for k, v in state.items() if ".transformer.layers." not in k}, tmp_path / "no_decoder.pth")
    with pytest.raises(ConversionError, match="no mask decoder transformer layers"):
        convert_checkpoint(no_decoder, tmp_path / "out", model="custom")


def _saved(state: dict, path: Path) -> Path:
    torch.save(state, path)
    return path


def test_sharded_hugging_face_checkpoints_convert(tmp_path):
    hf = build_small_hf_sam()
    hf.save_pretrained(tmp_path / "single")
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="1MB")
    index = tmp_path / "sharded" / "model.safetensors.index.json"
    assert index.is_file() and len(list((tmp_path / "sharded").glob("model-*.safetensors"))) > 1
    single = convert_checkpoint(tmp_path / "single", tmp_path / "from_single")
    sharded = convert_checkpoint(tmp_path / "sharded", tmp_path / "from_sharded")
    _same_weights(sharded, single)
    assert sharded.metadata["source_file"] == index.name and sharded.metadata["source_container"].endswith("shards")
    other = build_small_hf_sam(seed=1)  # other weights, the same index: another source_sha256
    other.save_pretrained(tmp_path / "other", max_shard_size="1MB")
    assert (tmp_path / "other" / index.name).read_bytes() == index.read_bytes()
    assert convert_checkpoint(tmp_path / "other", tmp_path / "from_other").metadata["source_sha256"] != sharded.metadata["source_sha256"]
    first = sorted((tmp_path / "sharded").glob("model-*.safetensors"))[0]
    first.unlink()
    with pytest.raises(ConversionError, match=f"shard\\(s\\) {first.name} not found beside it"):
        convert_checkpoint(index, tmp_path / "out")


def test_bfloat16_hugging_face_weights_convert_exactly(tmp_path):
    """bf16 fine-tunes: safetensors hands bfloat16 to NumPy as ml_dtypes' type (no np.floating
    subtype), torch as torch.bfloat16; both widen exactly to the same float32 weights."""
    hf = build_small_hf_sam().to(torch.bfloat16)
    hf.save_pretrained(tmp_path / "st")
    hf.save_pretrained(tmp_path / "bin", safe_serialization=False)
    from_st = convert_checkpoint(tmp_path / "st", tmp_path / "from_st")
    _same_weights(from_st, convert_checkpoint(tmp_path / "bin", tmp_path / "from_bin"))
    key = "vision_encoder.pos_embed"
    expected = hf.state_dict()[key].float().numpy()[0]
    np.testing.assert_array_equal(np.asarray(from_st.variables["params"]["image_encoder"]["pos_embed"])[0], expected)


def test_hugging_face_iou_head_missing_a_middle_layer_is_refused(tmp_path):
    from safetensors.torch import save_file

    hf = build_small_hf_sam()
    hf.save_pretrained(tmp_path / "partial")  # config.json beside the weights: iou_head_depth 3
    gone = "mask_decoder.iou_prediction_head.layers.0."  # the middle layer of three: 2 layers by the keys
    state = {k: v.contiguous().clone() for k, v in hf.state_dict().items() if not k.startswith(gone)}
    save_file(state, tmp_path / "partial" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ConversionError, match=r"its keys give the IoU head 2 layers, its config.json iou_head_depth 3"):
        convert_checkpoint(tmp_path / "partial", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_encoder_mlp_width_whose_ratio_rounds_down_converts(tmp_path):
    hf = build_small_hf_sam(dim=56, heads=2)  # 4 x 56 = 224 by default: made 61 below, 56 * (61 / 56) = 60.99...
    from transformers import SamModel

    config = hf.config
    config.vision_config.mlp_dim = 61
    model = SamModel(config).eval()
    model.save_pretrained(tmp_path / "hf")
    converted = convert_checkpoint(tmp_path / "hf", tmp_path / "out")
    assert converted.variables["params"]["image_encoder"]["blocks_0"]["mlp"]["lin1"]["kernel"].shape == (56, 61)


def test_integer_tensor_is_refused_naming_file_and_key(tmp_path, small_pth):
    state = torch.load(small_pth, weights_only=True)
    state["image_encoder.pos_embed"] = state["image_encoder.pos_embed"].long()
    torch.save(state, tmp_path / "ints.pth")
    with pytest.raises(ConversionError, match=r"ints.pth: tensor image_encoder.pos_embed is torch.int64, not floating point"):
        convert_checkpoint(tmp_path / "ints.pth", tmp_path / "out")


def test_decoder_heads_that_do_not_divide_the_decoder_width_are_refused(tmp_path, small_pth, capsys):
    _expect_cli_error(capsys, [small_pth, tmp_path / "out", "--decoder-heads", "3"],
                      "decoder_heads 3 does not divide the mask decoder's attention widths")
    assert not _leftovers(tmp_path, "out")


def test_every_missing_and_unused_key_is_reported_together(tmp_path, small_pth):
    state = torch.load(small_pth, weights_only=True)
    del state["image_encoder.blocks.0.mlp.lin2.bias"], state["mask_decoder.iou_token.weight"]
    state["image_encoder.extra_head.weight"] = torch.zeros(2, 2)
    state["prompt_encoder.no_mask_embed.weight"] = torch.zeros(1, 64)  # wrong width
    src = tmp_path / "broken.pth"
    torch.save(state, src)
    with pytest.raises(ConversionError) as info:
        convert_checkpoint(src, tmp_path / "out", model="auto")
    message = str(info.value)
    for needle in (
        "image_encoder/blocks_0/mlp/lin2/bias",
        "mask_decoder/iou_token",
        "image_encoder.extra_head.weight (2, 2)",
        "prompt_encoder.no_mask_embed.weight (1, 64)",
        "expects (128,)",
    ):
        assert needle in message
    assert "broken.pth" in message
    assert not (tmp_path / "out").exists()


# Architecture inference read each size from one tensor: corrupting it blamed its healthy
# neighbours (mis-shaped against the wrong architecture), or gave a message that named it nowhere.
CORRUPTIONS = {
    "mlp_width": ({"image_encoder.blocks.0.mlp.lin1.weight": (300, 96), "image_encoder.blocks.0.mlp.lin1.bias": (300,)},
                  ["conflicting: encoder MLP width 384 (from 10 tensors: ",
                   "but image_encoder.blocks.0.mlp.lin1.weight (300, 96), image_encoder.blocks.0.mlp.lin1.bias (300,) give 300"]),
    "mask_tokens": ({"mask_decoder.mask_tokens.weight": (5, 128)},
                    ["conflicting: number of masks 4 (from 3 tensors: ", "but mask_decoder.mask_tokens.weight (5, 128) gives 5"]),
    "pos_embed": ({"image_encoder.pos_embed": (1, 17, 17, 96)},
                  ["image grid 17x17 from image_encoder.pos_embed (1, 17, 17, 96)", "fit a 16x16 grid"]),
    "extra_block": ({"image_encoder.blocks.9.norm1.weight": (96,)},
                    ["encoder block numbers [0, 1, 2, 3, 9] are not 0..4: unexpected image_encoder.blocks.9.norm1.weight (96,)"]),
}


@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_model_auto_names_the_tensor_that_disagrees(tmp_path, corruption):
    changed, needles = CORRUPTIONS[corruption]
    state = build_small_sam().state_dict()
    state.update({k: torch.zeros(shape) for k, shape in changed.items()})
    src = tmp_path / "corrupt.pth"
    torch.save(state, src)
    with pytest.raises(ConversionError) as info:
        convert_checkpoint(src, tmp_path / "out")
    message = str(info.value)
    assert "corrupt.pth" in message
    for needle in needles:
        assert needle in message, message
    blamed = {line.split("mis-shaped: ", 1)[1].split(" (")[0] for line in message.splitlines()[1:] if "mis-shaped: " in line}
    assert blamed <= set(changed), message  # no healthy tensor is blamed


def test_wrong_format_says_which_format_the_keys_have(tmp_path, small_pth):
    with pytest.raises(ConversionError, match=r"has segment_anything keys \(image_encoder\.\*\), not hf ones.*'segment_anything'"):
        convert_checkpoint(small_pth, tmp_path / "out", format="hf")
    src = tmp_path / "hf.pth"
    torch.save(build_small_hf_sam().state_dict(), src)
    with pytest.raises(ConversionError, match=r"has hf keys \(vision_encoder\.\*\), not segment_anything ones.*'hf'"):
        convert_checkpoint(src, tmp_path / "out", format="segment_anything")
    assert convert_checkpoint(src, tmp_path / "out", format="hf").metadata["source_format"] == "hf"


def test_sigterm_while_writing_takes_effect_once_the_checkpoint_is_complete(tmp_path, small_pth, monkeypatch):
    """A SIGTERM (or Ctrl-C) in the middle of the Orbax writer left its hidden temporary folder beside
    the destination; held while it writes, it takes effect on a complete checkpoint."""
    import signal

    from radsam_jax.convert import convert as convert_module

    class Terminated(Exception):
        pass

    def on_sigterm(signum, frame):
        raise Terminated

    def save_while_terminated(*args, **kw):
        signal.raise_signal(signal.SIGTERM)  # arrives while the checkpoint is being written
        return real_save(*args, **kw)

    real_save = convert_module.save_model
    monkeypatch.setattr(convert_module, "save_model", save_while_terminated)
    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        with pytest.raises(Terminated):
            convert_checkpoint(small_pth, tmp_path / "out")
        assert signal.getsignal(signal.SIGTERM) is on_sigterm
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert load_checkpoint(tmp_path / "out").config.encoder_depth == 4


def test_random_reference_checkpoint_outside_the_repository(tmp_path, monkeypatch):
    """It imported the converter as `convert.convert`, a module only the repository root provides."""
    from radsam_jax.convert import convert as convert_module
    from radsam_jax.convert import reference

    monkeypatch.setattr(sys, "path", [p for p in sys.path if not (Path(p or ".").resolve() / "convert" / "convert.py").is_file()])
    for name in ("convert", "convert.convert"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.setattr(reference, "build_torch_sam", lambda name: build_small_sam())  # not ViT-B: fast
    real_convert = convert_module.convert_checkpoint
    monkeypatch.setattr(convert_module, "convert_checkpoint", lambda src, dst, model: real_convert(src, dst))
    pth, dst = reference.random_reference_checkpoint(tmp_path, "vit_b")
    assert pth.is_file() and load_checkpoint(dst).config.encoder_depth == 4


# --------------------------------------------------------------------------- bad inputs and the CLI


def _run_cli(*args):
    return subprocess.run([sys.executable, "-m", "radsam_jax.convert.cli", *map(str, args)], capture_output=True, text=True, cwd=REPO)


def _leftovers(directory: Path, name: str):
    return [p for p in directory.iterdir() if p.name.startswith(f".{name}") or p.name == name]


def _expect_cli_error(capsys, args, *needles):
    status = cli.main([str(a) for a in args])
    err = capsys.readouterr().err
    assert status == 2
    assert err.startswith("radsam convert: error: ") and "Traceback" not in err
    for needle in needles:
        assert needle in err, err
    return err


def test_cli_converts_small_model_with_model_auto(tmp_path, small_pth):
    dst = tmp_path / "small_radsam"
    result = _run_cli(small_pth, dst, "--model", "auto")
    assert result.returncode == 0, result.stderr
    assert "converted" in result.stdout and "256x256" in result.stdout
    header = json.loads((dst / "radsam.json").read_text())
    assert header["model_config"]["image_size"] == 256 and header["model_config"]["window_size"] == 6
    assert header["metadata"]["source_file"] == "small.pth"
    assert header["metadata"]["source_sha256"] == hashlib.sha256(small_pth.read_bytes()).hexdigest()
    assert header["metadata"]["source_format"] == "segment_anything"
    assert load_checkpoint(dst).config.global_attn_indexes == (1, 3)
    assert header["model_config"]["preprocessing"] == "sam"
    assert "8 decoder heads (assumed: SAM's)" in result.stdout  # no tensor tells: said, and --decoder-heads overrides
    assert convert_checkpoint(small_pth, tmp_path / "four", decoder_heads=4).config.decoder_heads == 4
    with pytest.raises(ConversionError, match="decoder_heads 4: give a positive count, and only with model 'auto' or 'custom'"):
        convert_checkpoint(small_pth, tmp_path / "preset", model="small", decoder_heads=4)


def test_cli_medsam_preprocessing_is_recorded(tmp_path, small_pth):
    dst = tmp_path / "medsam"
    result = _run_cli(small_pth, dst, "--preprocessing", "medsam")
    assert result.returncode == 0, result.stderr
    assert "medsam preprocessing" in result.stdout
    assert load_checkpoint(dst).config.preprocessing == "medsam"


def test_mask_prompt_encoding_is_recorded(tmp_path, small_pth):
    # SAM-family weights read their previous logits as the mask prompt; RadSAM-trained ones read 0/1.
    assert convert_checkpoint(small_pth, tmp_path / "sam").config.mask_prompt == "logits"
    assert load_checkpoint(tmp_path / "sam").config.mask_prompt == "logits"
    assert convert_checkpoint(small_pth, tmp_path / "radsam", mask_prompt="binary").config.mask_prompt == "binary"
    assert load_checkpoint(tmp_path / "radsam").config.mask_prompt == "binary"
    with pytest.raises(ConversionError, match="unknown mask_prompt 'soft'"):
        convert_checkpoint(small_pth, tmp_path / "bad", mask_prompt="soft")
    # Written before the field existed: a conversion (its metadata names the source format) is SAM's
    # encoding; a file without that metadata (a trained model) keeps RadSAM's.
    header_file = tmp_path / "sam" / "radsam.json"
    header = json.loads(header_file.read_text())
    del header["model_config"]["mask_prompt"]
    header_file.write_text(json.dumps(header))
    assert load_checkpoint(tmp_path / "sam").config.mask_prompt == "logits"
    del header["metadata"]["source_format"]
    header_file.write_text(json.dumps(header))
    assert load_checkpoint(tmp_path / "sam").config.mask_prompt == "binary"


def test_cli_truncated_checkpoint(tmp_path, small_pth):
    src = tmp_path / "truncated.pth"
    src.write_bytes(small_pth.read_bytes()[: small_pth.stat().st_size // 2])
    result = _run_cli(src, tmp_path / "out")
    assert result.returncode == 2
    assert result.stderr.startswith("radsam convert: error: ") and "Traceback" not in result.stderr
    assert "truncated.pth" in result.stderr and "truncated" in result.stderr.split("truncated.pth", 1)[1]
    assert not _leftovers(tmp_path, "out")


def test_cli_damaged_tensor_bytes_and_non_finite_weights(tmp_path, small_pth, capsys):
    """torch.load reads a zip member whose bytes changed without checking its CRC-32: the converter
    checks it, and refuses NaN / infinite weights (a damaged safetensors file has no checksum)."""
    import struct
    import zipfile

    with zipfile.ZipFile(small_pth) as archive:
        member = next(i for i in archive.infolist() if "/data/" in i.filename and i.file_size >= 64)
    data = bytearray(small_pth.read_bytes())
    name_length, extra_length = struct.unpack("<HH", data[member.header_offset + 26: member.header_offset + 30])
    start = member.header_offset + 30 + name_length + extra_length
    data[start + 16: start + 32] = bytes(b ^ 0xFF for b in data[start + 16: start + 32])
    damaged = tmp_path / "damaged.pth"
    damaged.write_bytes(bytes(data))
    _expect_cli_error(capsys, [damaged, tmp_path / "out"], "damaged.pth: damaged checkpoint: its member",
                      member.filename, "fails its CRC-32 check")
    assert not _leftovers(tmp_path, "out")
    state = torch.load(small_pth, weights_only=True)
    torch.serialization.set_crc32_options(False)  # PyTorch's faster saving: every CRC 0, nothing to check
    try:
        torch.save(state, tmp_path / "no_crc.pth")
    finally:
        torch.serialization.set_crc32_options(True)
    assert cli.main([str(tmp_path / "no_crc.pth"), str(tmp_path / "from_no_crc")]) == 0
    assert (tmp_path / "from_no_crc" / "radsam.json").exists()
    state["image_encoder.patch_embed.proj.weight"][0, 0, 0, :3] = float("nan")
    nan = tmp_path / "nan.pth"
    torch.save(state, nan)
    _expect_cli_error(capsys, [nan, tmp_path / "out"],
                      "nan.pth: tensor image_encoder.patch_embed.proj.weight holds 3 NaN or infinite value(s)")
    assert not _leftovers(tmp_path, "out")


def test_cli_text_file(tmp_path, capsys):
    src = tmp_path / "notes.pth"
    src.write_text("this is not a checkpoint\n" * 10)
    _expect_cli_error(capsys, [src, tmp_path / "out"], "notes.pth", "not a checkpoint")
    assert not _leftovers(tmp_path, "out")
    src = tmp_path / "notes.safetensors"
    src.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    _expect_cli_error(capsys, [src, tmp_path / "out"], "notes.safetensors")


def test_cli_missing_source(tmp_path, capsys):
    _expect_cli_error(capsys, [tmp_path / "nope.pth", tmp_path / "out"], "nope.pth", "does not exist")


def test_cli_existing_destination_is_refused_before_any_work(tmp_path, capsys):
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    _expect_cli_error(capsys, [tmp_path / "does_not_even_exist.pth", dst], str(dst), "already exists")
    assert [p.name for p in dst.iterdir()] == ["keep.txt"]


def test_cli_write_failure_exits_1_naming_the_destination(tmp_path, capsys, small_pth, monkeypatch):
    from radsam_jax.convert import convert

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(convert, "save_model", full_disk)
    assert cli.main([str(small_pth), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"radsam convert: error: writing {tmp_path / 'out'} failed: ") and "No space" in err, err
    assert "Traceback" not in err


def test_cli_vit_b_checkpoint_with_model_vit_l(tmp_path, capsys):
    """A ViT-B state dict (real shapes, stride-0 storage so the file is tiny) converted as ViT-L."""
    sam_model_registry, _ = import_segment_anything()
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in sam_model_registry["vit_b"]().state_dict().items()}
    src = tmp_path / "sam_vit_b.pth"
    torch.save({k: torch.zeros(1).expand(s) for k, s in shapes.items()}, src)
    err = _expect_cli_error(
        capsys, [src, tmp_path / "out", "--model", "vit_l"],
        "sam_vit_b.pth",
        "first: mis-shaped: image_encoder.pos_embed (1, 64, 64, 768)",
        "expects (1, 64, 64, 1024)",
    )
    assert "missing: params/image_encoder/blocks_12/" in err
    assert not _leftovers(tmp_path, "out")

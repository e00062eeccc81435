"""Weight loading: every parameter by table with its shape, clear failures, dummy weights at real shapes."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from qwen3vl_backend.loader import WeightLoadError, build_model, count_parameters, load_model, load_weights
from qwen3vl_backend.model_config import ModelConfig

CONFIGS = Path(__file__).resolve().parent.parent / "qwen3vl_backend" / "data" / "configs"


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_every_parameter_loaded_with_its_shape(tiny_moe):
    model = build_model(ModelConfig.from_path(tiny_moe))
    loaded = load_weights(model, tiny_moe)
    assert loaded == {n for n, _ in model.named_parameters(remove_duplicate=False)}
    # the fused experts were transposed into linear layout
    ckpt = {}
    for f in sorted(Path(tiny_moe).glob("*.safetensors")):
        ckpt.update(load_file(str(f)))
    gate_up = ckpt["model.language_model.layers.0.mlp.experts.gate_up_proj"]
    assert gate_up.shape == (8, 64, 96)
    torch.testing.assert_close(model.model.language_model.layers[0].mlp.experts.w13.data, gate_up.transpose(1, 2))


def test_tied_head_shares_the_embedding(tiny_dense):
    model = load_model(tiny_dense)
    assert model.lm_head.weight.data_ptr() == model.model.language_model.embed_tokens.weight.data_ptr()


def _edit_shard(d, name, edit) -> None:
    """Rewrite the shard holding tensor `name` after edit(tensors) changes its dict in place."""
    index = json.loads((d / "model.safetensors.index.json").read_text())
    file = d / index["weight_map"][name]
    tensors = load_file(str(file))
    edit(tensors)
    save_file(tensors, str(file))


def test_missing_tensor_is_named(tiny_dense, tmp_path):
    d = _copy(tiny_dense, tmp_path / "ckpt")
    name = "model.language_model.layers.1.self_attn.k_norm.weight"
    _edit_shard(d, name, lambda tensors: tensors.pop(name))
    with pytest.raises(WeightLoadError, match="lacks 1 tensors.*layers.1.self_attn.k_norm.weight"):
        load_weights(build_model(ModelConfig.from_path(d)), d)


def test_unexpected_tensor_is_named(tiny_dense, tmp_path):
    d = _copy(tiny_dense, tmp_path / "ckpt")
    save_file({"model.language_model.layers.0.mlp.bogus.weight": torch.zeros(2)}, str(d / "extra.safetensors"))
    index = json.loads((d / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.language_model.layers.0.mlp.bogus.weight"] = "extra.safetensors"
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(WeightLoadError, match="unexpected tensor 'model.language_model.layers.0.mlp.bogus.weight'"):
        load_weights(build_model(ModelConfig.from_path(d)), d)


def test_misshaped_tensor_is_named(tiny_moe, tmp_path):
    d = _copy(tiny_moe, tmp_path / "ckpt")
    name = "model.language_model.layers.2.mlp.experts.down_proj"
    # the unreleased layout
    _edit_shard(d, name, lambda tensors: tensors.update({name: tensors[name].transpose(1, 2).contiguous()}))
    with pytest.raises(WeightLoadError, match=r"layers.2.mlp.experts.down_proj: checkpoint shape \(8, 64, 48\), expected \(8, 48, 64\)"):
        load_weights(build_model(ModelConfig.from_path(d)), d)


def test_per_expert_checkpoint_layout_loads(tiny_moe, tmp_path):
    """Checkpoints with one tensor per expert (e.g. re-exported ones) map through the same table."""
    ref = load_model(tiny_moe)
    d = _copy(tiny_moe, tmp_path / "ckpt")
    state = {}
    for f in sorted(d.glob("*.safetensors")):
        state.update(load_file(str(f)))
        f.unlink()
    (d / "model.safetensors.index.json").unlink()
    for key in [k for k in state if k.endswith("experts.gate_up_proj")]:
        prefix = key[: -len("gate_up_proj")]
        gate_up, down = state.pop(key), state.pop(prefix + "down_proj")
        inter = down.shape[1]
        for e in range(gate_up.shape[0]):
            state[f"{prefix}{e}.gate_proj.weight"] = gate_up[e, :, :inter].T.contiguous()
            state[f"{prefix}{e}.up_proj.weight"] = gate_up[e, :, inter:].T.contiguous()
            state[f"{prefix}{e}.down_proj.weight"] = down[e].T.contiguous()
    save_file(state, str(d / "model.safetensors"))
    model = load_model(d)
    for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        assert torch.equal(p, q), n


def test_unknown_architecture_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(ValueError, match="unsupported architecture 'LlamaForCausalLM'"):
        ModelConfig.from_path(tmp_path)


@pytest.mark.parametrize("name,billions", [("Qwen3-VL-30B-A3B-Instruct", 31.07), ("Qwen3-VL-235B-A22B-Instruct", 235.67),
                                           ("Qwen3-VL-4B-Instruct", 4.44)])
def test_meta_build_reports_real_parameter_count(name, billions):
    model = build_model(ModelConfig.from_path(CONFIGS / f"{name}.json"), "meta")
    assert all(p.device.type == "meta" for p in model.parameters())
    assert round(count_parameters(model) / 1e9, 2) == billions


def test_weights_that_cannot_fit_are_refused_before_allocating(monkeypatch):
    import qwen3vl_backend.loader as loader

    monkeypatch.setattr(loader, "free_memory_bytes", lambda device: 8 * 10**9)
    path = CONFIGS / "Qwen3-VL-235B-A22B-Instruct.json"
    with pytest.raises(WeightLoadError, match=r"the weights need 471\.3 GB \(torch\.bfloat16\) but cpu has 8\.0 GB free"):
        load_model(path, "cpu", torch.bfloat16, "dummy")
    monkeypatch.setattr(loader, "free_memory_bytes", lambda device: 10**8)
    with pytest.raises(WeightLoadError, match="the vision tower of Qwen3-VL-235B-A22B-Instruct.json: the weights need"):
        loader.load_vision_model(path, "cpu", torch.bfloat16, "dummy")
    monkeypatch.setattr(loader, "free_memory_bytes", lambda device: None)      # unknown: no check
    loader.check_weights_fit(build_model(ModelConfig.from_path(path), "meta", torch.bfloat16), "cpu", "x")


def test_param_count_command_on_30b():
    out = subprocess.run([sys.executable, "-m", "qwen3vl_backend.tools.param_count",
                          str(CONFIGS / "Qwen3-VL-30B-A3B-Instruct.json")], capture_output=True, text=True, check=True)
    report = json.loads(out.stdout)
    assert report["device"] == "meta" and 31.0e9 < report["parameters"] < 31.2e9


def test_dummy_load_format_needs_no_weight_files(tiny_moe, tmp_path):
    (tmp_path / "config.json").write_text((Path(tiny_moe) / "config.json").read_text())
    model = load_model(tmp_path, load_format="dummy")
    assert count_parameters(model) == count_parameters(load_model(tiny_moe))
    assert torch.isfinite(model.lm_head.weight).all() and model.lm_head.weight.std() > 0


def test_vision_tower_loads_alone(tiny_moe):
    from qwen3vl_backend.loader import load_vision_model

    full, vision = load_model(tiny_moe), load_vision_model(tiny_moe)
    assert count_parameters(vision) == count_parameters(full.model.visual) < count_parameters(full) / 2
    for (n, p), (_, q) in zip(vision.named_parameters(), full.model.visual.named_parameters()):
        assert torch.equal(p, q), n


def test_dummy_weights_are_reproducible(tiny_moe, tmp_path):
    (tmp_path / "config.json").write_text((Path(tiny_moe) / "config.json").read_text())
    a, b = load_model(tmp_path, load_format="dummy"), load_model(tmp_path, load_format="dummy")
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


@pytest.mark.parametrize("name,message", [
    ("model.language_model.layers.1.self_attn.k_proj.weight",
     r"layers.1.self_attn.qkv_proj.weight: the checkpoint has \['q', 'v'\] of q, k, v"),
    ("model.language_model.layers.2.mlp.up_proj.weight", r"layers.2.mlp.gate_up_proj.weight: the checkpoint lacks the up"),
])
def test_a_missing_piece_of_a_merged_weight_is_named(tiny_dense, tmp_path, name, message):
    d = _copy(tiny_dense, tmp_path / "ckpt")
    _edit_shard(d, name, lambda tensors: tensors.pop(name))
    with pytest.raises(WeightLoadError, match=message):
        load_weights(build_model(ModelConfig.from_path(d)), d)


def test_checkpoint_tensors_invert_the_table(tiny_moe):
    """Reading a loaded model back under the checkpoint's names gives the checkpoint's tensors."""
    from qwen3vl_backend.loader import checkpoint_tensors

    ckpt = {}
    for f in sorted(Path(tiny_moe).glob("*.safetensors")):
        ckpt.update(load_file(str(f)))
    back = checkpoint_tensors(load_model(tiny_moe))
    assert set(back) == set(ckpt)
    assert all(torch.equal(back[n], ckpt[n]) for n in ckpt)

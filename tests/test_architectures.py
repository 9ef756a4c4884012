"""The model types people fine-tune now (tests/arch_models.py: tiny random 4-bit folders of each mlx-lm
model type), each through what a user does: LoRA on at least the layers mlx_lm.lora adapts by default
(its routers excepted), the planner counting exactly those adapters, a few training steps that lower
the loss, generation, and an MLX export that answers like base + adapters."""

from __future__ import annotations

import json
import math

import steadytune  # noqa: F401  (fast BLAS before mlx)

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm.tuner.utils import linear_to_lora_layers

from steadytune import plan
from steadytune.config import Config, LoraConfig
from steadytune.errors import UserError
from steadytune.model import apply_lora, lora_targets, model_skeleton, parameter_bytes

import arch_models
from conftest import make_chat_data

ARCHS = arch_models.ARCHS


def adapted(model) -> set[tuple[int, str]]:
    """(block, name inside the block) of every layer holding an adapter."""
    return {(i, name) for i, block in enumerate(model.layers) for name, m in block.named_modules()
            if "lora_a" in m}


# MoE routers as linear layers (mlx-lm's default adapts them; steadytune keeps them frozen unless
# named). deepseek_v3, glm4_moe and glm4_moe_lite route with a MoEGate, which no LoRA adapts.
ROUTERS = {"qwen3_moe": "mlp.gate", "qwen3_next": "mlp.gate", "qwen3_5_moe": "mlp.gate",
           "mistral4": "mlp.gate", "phimoe": "block_sparse_moe.gate", "mixtral": "block_sparse_moe.gate",
           "gpt_oss": "mlp.router", "granitemoehybrid": "block_sparse_moe.router.layer",
           "lfm2_moe": "feed_forward.gate", "llama4": "feed_forward.router"}


# Layers mlx-lm's default adapts and then fails on: the model reads and rewrites their weights itself.
WEIGHT_READ = {"gemma3n": {"altup.prediction_coefs", "altup.correction_coefs"}}


def mlx_lm_default(config: dict, num_layers: int) -> set[tuple[int, str]]:
    """What mlx_lm.lora adapts by default (no keys: every linear layer of the last blocks)."""
    reference = model_skeleton(config)
    reference.freeze()
    linear_to_lora_layers(reference, num_layers, {"rank": 8, "scale": 20.0, "dropout": 0.0})
    return adapted(reference)


@pytest.mark.parametrize("name", ARCHS)
def test_default_adapters_cover_mlx_lm_lora_and_the_planner_counts_them(name):
    config = arch_models.tiny_config(name)
    lcfg = LoraConfig(rank=8)
    model = model_skeleton(config)
    model.freeze()
    apply_lora(model, lcfg, seed=0)
    layers = len(model.layers)
    reference = mlx_lm_default(config, layers)
    router = {(i, k) for i, k in reference if k == ROUTERS.get(name)}
    assert router or name not in ROUTERS
    weight_read = {(i, k) for i, k in reference if k in WEIGHT_READ.get(name, ())}
    assert adapted(model) == reference - router - weight_read
    # the planner's count, from the config alone, is what apply_lora created
    trainable = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    cfg = Config(lora=lcfg)
    arch = plan.arch_from_config(config)
    run, _ = plan.run_from_config(cfg, arch, [64], device="cpu", model_config=config)
    assert plan.lora_parameter_count(arch, run) == trainable
    assert plan.estimate(arch, run).lora_weights == 4 * trainable  # float32 adapters
    # only the last blocks with --lora-layers, as mlx_lm.lora --num-layers
    last = LoraConfig(num_layers=1)
    assert {t.block for t in lora_targets(model_skeleton(config), last)} == {layers - 1}


def test_a_router_is_adapted_only_when_named_and_a_typo_gets_the_closest_name():
    config = arch_models.tiny_config("qwen3_moe")
    keys = {t.key for t in lora_targets(model_skeleton(config), LoraConfig())}
    assert "mlp.gate" not in keys and "mlp.switch_mlp.up_proj" in keys
    named = lora_targets(model_skeleton(config), LoraConfig(target_modules=["mlp.gate", "self_attn"]))
    assert {t.key for t in named} == {"mlp.gate", "self_attn.q_proj", "self_attn.k_proj",
                                      "self_attn.v_proj", "self_attn.o_proj"}
    assert {t.d_out for t in named if t.key == "mlp.gate"} == {4}  # one output per expert
    with pytest.raises(UserError, match=r"mlp\.switch_mlp\.up_prj \(did you mean mlp\.switch_mlp\.up_proj\?\)"):
        lora_targets(model_skeleton(config), LoraConfig(target_modules=["mlp.switch_mlp.up_prj"]))


def test_hybrid_blocks_each_get_their_own_layers_and_a_name_outside_the_adapted_blocks_is_refused():
    config = arch_models.tiny_config("qwen3_next")  # blocks 0, 2: linear attention; 1, 3: attention
    targets = lora_targets(model_skeleton(config), LoraConfig(target_modules=["self_attn", "linear_attn"]))
    assert {t.block for t in targets if t.key.startswith("self_attn.")} == {1, 3}
    assert {t.block for t in targets if t.key.startswith("linear_attn.")} == {0, 2}
    with pytest.raises(UserError, match="linear_attn.out_proj is in none of the last 1 blocks"):
        lora_targets(model_skeleton(config), LoraConfig(target_modules=["linear_attn.out_proj"], num_layers=1))


def test_a_layer_whose_weight_the_model_rewrites_is_refused_by_name():
    config = arch_models.tiny_config("gemma3n")
    with pytest.raises(UserError, match="altup.prediction_coefs is a Linear in block 0: the model reads its weight"):
        lora_targets(model_skeleton(config), LoraConfig(target_modules=["altup.prediction_coefs"]))


def test_expert_adapters_compute_like_mlx_lm_in_the_input_dtype():
    """MixedLoRASwitchLinear: mlx-lm's LoRASwitchLinear (gather_mm on the routed experts' adapters)
    with the adapters cast to the input's dtype (on a GPU; MLX's CPU gather_mm is float32 only):
    the same numbers in float32."""
    from mlx_lm.models.switch_layers import SwitchLinear
    from mlx_lm.tuner.lora import LoRASwitchLinear

    from steadytune.qlora import MixedLoRASwitchLinear

    mx.random.seed(0)
    layer = LoRASwitchLinear.from_base(SwitchLinear(32, 16, 4), r=4, scale=2.0)
    layer.lora_b = mx.random.normal(layer.lora_b.shape) * 0.1
    x = mx.random.normal((3, 5, 1, 1, 32))
    idx = mx.random.randint(0, 4, (3, 5, 2))
    ref = layer(x, idx)
    layer.__class__ = MixedLoRASwitchLinear
    assert mx.array_equal(layer(x, idx), ref)


# --------------------------------------------------------------------------- train, generate, export

@pytest.fixture(scope="module")
def data(tmp_path_factory):
    # four examples, one micro-batch: each step sees the same tokens, so the loss must fall
    return make_chat_data(tmp_path_factory.mktemp("arch-data"), 4, 2)


def train(folder, data, out, pack: bool = True):
    return steadytune.train({"model": {"path": str(folder)}, "data": {"path": str(data)},
                             "training": {"epochs": 2, "batch_size": 4, "learning_rate": 1e-2, "eval_every": 0,
                                          "save_every": 0, "log_every": 1, "pack": pack},
                             "output": {"dir": str(out), "progress": "none"}})


@pytest.mark.parametrize("name", ARCHS)
def test_trains_generates_and_exports_to_mlx(name, data, tmp_path):
    from mlx_lm.utils import load

    from steadytune.export import export
    from steadytune.generation import generate, load_tuned

    folder = arch_models.build(tmp_path / "model", name)
    try:
        result = train(folder, data, tmp_path / "run")
    except UserError as e:  # a family that trains unpacked says so
        if "--pack false" not in str(e):
            raise
        result = train(folder, data, tmp_path / "run-unpacked", pack=False)
    losses = [h["loss"] for h in result.history if h.get("event") == "train"]
    assert len(losses) == 2 and all(map(math.isfinite, losses))
    assert losses[-1] < losses[0], losses

    tuned = load_tuned(result.run_dir, dtype="float32")
    assert isinstance(generate(tuned, "hello", max_tokens=2), str)
    # the planner, from config.json alone, holds the base and the adapters byte for byte as loaded
    config = json.loads((folder / "config.json").read_text())
    arch = plan.arch_from_config(config)
    run, _ = plan.run_from_config(Config(), arch, [64], device="cpu", model_config=config)
    assert plan.base_weight_bytes(arch, run) + plan.estimate(arch, run).lora_weights == \
        parameter_bytes(tuned.model)

    exported, _ = load(str(export(result.run_dir, "mlx", tmp_path / "export", dtype="float32")))
    tokens = mx.array([[1, 17, 42, 99, 5, 230, 64, 7]])
    want, got = tuned.model(tokens), exported(tokens)
    # float32 both: the fused weight W + s B A vs W x + s (x A) B differ by reassociation only, a
    # few float32 ulps per product summed over the hidden width and the blocks
    bound = 64 * np.finfo(np.float32).eps * len(tuned.model.layers) * arch_models.H * float(mx.abs(want).max())
    assert float(mx.abs(got - want).max()) <= bound


def test_a_refused_export_names_one_that_works_for_the_family():
    from steadytune.export import GGUF_ARCH, HF_NAMED, instead

    # a type steadytune writes neither as an HF folder nor as GGUF: only the MLX folder is left
    for fmt in ("hf", "gguf"):
        assert instead("some_new_type", fmt) == "use --format mlx (an mlx-lm folder: mlx_lm.generate --model OUT)"
    assert "llama" in HF_NAMED
    assert instead("llama", "gguf") == "use --format hf and llama.cpp's convert_hf_to_gguf.py, or --format mlx"
    # llama4, mistral4: an HF folder (transformers' text-only class) but no GGUF of steadytune's own
    for model_type in ("llama4", "mistral4"):
        assert model_type in HF_NAMED and model_type not in GGUF_ARCH
        assert instead(model_type, "gguf") == instead("llama", "gguf")
    # qwen3_next: an HF folder, which llama.cpp's converter reads, but no GGUF of steadytune's own
    assert "qwen3_next" in HF_NAMED and "qwen3_next" not in GGUF_ARCH
    assert instead("qwen3_next", "gguf") == instead("llama", "gguf")

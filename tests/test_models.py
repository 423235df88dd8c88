"""Real models recorded as researchers train them: transformers' GPT-2, a Llama, a ViT, a CNN, a
compiled model, bf16 weights and peft LoRA.

Each test keeps its own copies of the weights, taken through its own optimizer hook (not through
spectra), compares every stored W_t with them bitwise in the orientation the test works out
itself, checks which matrices were recorded, and runs analyze() on the store.
"""

import numpy as np
import pytest
import torch
from torch import nn

import spectra
from conftest import analyze_with_defaults
from spectra.capture.recorder import Recorder

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


def _train(model, batches, steps, path, every=2, lr=1e-2, watch=None, **recorder_kwargs):
    """AdamW on the trainable parameters for ``steps`` steps, recorded into ``path``. Returns the
    test's own copies {step: {name: tensor}} of ``watch``'s parameters (default: the model's)
    taken by its own optimizer step hook."""
    watch = model if watch is None else watch
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)
    copies, counter = {}, [0]

    def keep(*_):
        counter[0] += 1
        copies[counter[0]] = _own_copy(watch)

    copies[0] = _own_copy(watch)
    optimizer.register_step_post_hook(keep)
    with Recorder(model, path, every=every, **recorder_kwargs) as rec:
        for step in range(steps):
            loss = batches(step)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            rec.step(loss=loss.item())
    return copies


def _own_copy(model):
    return {name: p.detach().clone() for name, p in model.named_parameters(remove_duplicate=False)}


def _assert_recorded_bitwise(path, copies, expected):
    """``expected``: stored name → function(copies at a step) → the (out, in) matrix."""
    run = spectra.open_run(path)
    assert run.params == list(expected)
    assert len(run) >= 2
    for t, step in enumerate(run.steps):
        for name, matrix in expected.items():
            want = matrix(copies[int(step)]).to(torch.float32).numpy()
            np.testing.assert_array_equal(run.weights(name, t), want, err_msg=f"{name} at {step}")
    return run


def _assert_updates_moved(frame):
    moved = frame.query("metric == 'frobenius_norm' and target == 'updates' and step > 0")
    assert len(moved) and (moved["value"] > 0).all()


def _lm_batches(model, vocab, seq=12, batch=4, seed=0):
    g = torch.Generator().manual_seed(seed)

    def loss(step):
        ids = torch.randint(0, vocab, (batch, seq), generator=g)
        return model(input_ids=ids, labels=ids).loss
    return loss


def _gpt2(seed=0):
    torch.manual_seed(seed)
    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=64, n_positions=16,
                                     bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config)


def test_gpt2_matrices_are_out_by_in_and_the_tied_head_is_recorded_once(tmp_path):
    model = _gpt2()
    copies = _train(model, _lm_batches(model, 64), 6, tmp_path / "r.zarr")
    conv1d = [f"transformer.h.{i}.{part}.weight" for i in range(2)
              for part in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
    expected = {name: (lambda c, n=name: c[n].T) for name in conv1d}
    expected["lm_head.weight"] = lambda c: c["transformer.wte.weight"]
    run = _assert_recorded_bitwise(tmp_path / "r.zarr", copies, expected)
    assert run.shape("transformer.h.0.mlp.c_fc.weight") == (128, 32)  # (out, in) = (4·d, d)
    head = run.spec("lm_head.weight")
    assert head.kind == "linear" and head.attrs["tied_to"] == ["transformer.wte.weight"]
    # the stored matrix is the map: Conv1D(x) = x Mᵀ + b
    fc = model.transformer.h[0].mlp.c_fc
    x = torch.randn(3, 32)
    matrix = torch.from_numpy(run.weights("transformer.h.0.mlp.c_fc.weight", -1))
    torch.testing.assert_close(fc(x).detach(), x @ matrix.T + fc.bias.detach())
    frame = analyze_with_defaults(tmp_path / "r.zarr")
    _assert_updates_moved(frame)


def test_llama_records_its_projections_and_untied_head(tmp_path):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=48,
                                      tie_word_embeddings=False, max_position_embeddings=32)
    model = transformers.LlamaForCausalLM(config)
    copies = _train(model, _lm_batches(model, 48), 5, tmp_path / "r.zarr")
    names = [f"model.layers.{i}.{part}.weight" for i in range(2) for part in
             ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
              "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")] + ["lm_head.weight"]
    run = _assert_recorded_bitwise(tmp_path / "r.zarr", copies,
                                   {n: (lambda c, n=n: c[n]) for n in names})
    assert run.shape("model.layers.0.self_attn.k_proj.weight") == (16, 32)  # 2 kv heads of 8
    frame = analyze_with_defaults(tmp_path / "r.zarr")
    _assert_updates_moved(frame)


def _vit(labels=2):
    torch.manual_seed(0)
    config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                    intermediate_size=64, image_size=16, patch_size=4,
                                    num_labels=labels)
    return transformers.ViTForImageClassification(config)


def _image_batches(model, labels=2, seed=0):
    g = torch.Generator().manual_seed(seed)

    def loss(step):
        x = torch.randn(4, 3, 16, 16, generator=g)
        y = torch.randint(0, labels, (4,), generator=g)
        return model(pixel_values=x, labels=y).loss
    return loss


def test_vit_skips_token_tables_and_records_patch_kernel_and_two_class_head(tmp_path):
    model = _vit()
    copies = _train(model, _image_batches(model), 4, tmp_path / "r.zarr")
    layer = "vit.layers.0"
    names = ([f"{layer}.attention.{p}.weight" for p in ("q_proj", "k_proj", "v_proj", "o_proj")]
             + [f"{layer}.mlp.fc1.weight", f"{layer}.mlp.fc2.weight", "classifier.weight"])
    expected = {"vit.embeddings.patch_embeddings.projection.weight":
                lambda c: c["vit.embeddings.patch_embeddings.projection.weight"].reshape(32, -1)}
    expected.update({n: (lambda c, n=n: c[n]) for n in names})
    run = _assert_recorded_bitwise(tmp_path / "r.zarr", copies, expected)
    assert run.shape("classifier.weight") == (2, 32)
    assert run.shape("vit.embeddings.patch_embeddings.projection.weight") == (32, 3 * 4 * 4)
    frame = analyze_with_defaults(tmp_path / "r.zarr")
    _assert_updates_moved(frame)
    # asked for by name, the (1, 1, d) and (1, N, d) tables are stored without the singleton
    asked = Recorder(model, tmp_path / "t.zarr", include=["*cls_token", "*position_embeddings"])
    assert [m.spec.shape for m in asked.matrices] == [(1, 32), (17, 32)]


class CNN(nn.Module):
    """A conv encoder and a transposed-conv decoder (grouped), and a linear head."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Conv2d(3, 8, 3, padding=1)
        self.dec = nn.ConvTranspose2d(8, 4, 3, padding=1, groups=2)
        self.head = nn.Linear(4 * 8 * 8, 5)

    def forward(self, x):
        return self.head(torch.relu(self.dec(torch.relu(self.enc(x)))).flatten(1))


def _conv_transpose_reference(w, groups):
    """(in, out/g, k, k) → (out, in/g·k·k) by explicit loops over output channels."""
    in_channels, out_per = w.shape[:2]
    in_per = in_channels // groups
    rows = []
    for o in range(out_per * groups):
        g, j = divmod(o, out_per)
        rows.append(torch.cat([w[g * in_per + i, j].flatten() for i in range(in_per)]))
    return torch.stack(rows)


def test_cnn_conv_and_conv_transpose_kernels_are_out_by_in(tmp_path):
    torch.manual_seed(0)
    model = CNN()
    g = torch.Generator().manual_seed(0)

    def loss(step):
        x = torch.randn(4, 3, 8, 8, generator=g)
        return nn.functional.cross_entropy(model(x), torch.randint(0, 5, (4,), generator=g))

    copies = _train(model, loss, 4, tmp_path / "r.zarr")
    run = _assert_recorded_bitwise(tmp_path / "r.zarr", copies, {
        "enc.weight": lambda c: c["enc.weight"].reshape(8, 27),
        "dec.weight": lambda c: _conv_transpose_reference(c["dec.weight"], groups=2),
        "head.weight": lambda c: c["head.weight"]})
    assert run.shape("dec.weight") == (4, 4 * 9) and run.original_shape("dec.weight") == (8, 2, 3, 3)
    assert "layout" in run.spec("dec.weight").attrs
    frame = analyze_with_defaults(tmp_path / "r.zarr")
    _assert_updates_moved(frame)


def test_compiled_model_records_plain_names_and_resumes_either_way(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
    compiled = torch.compile(model, backend="eager")  # the wrapper is the same for any backend
    g = torch.Generator().manual_seed(0)

    def loss_of(net):
        return lambda step: net(torch.randn(8, 6, generator=g)).pow(2).mean()

    path = tmp_path / "r.zarr"
    first = _train(compiled, loss_of(compiled), 4, path, watch=model)
    later = _train(model, loss_of(model), 4, path)  # the plain model continues the store
    copies = {**first, **{4 + k: v for k, v in later.items()}}
    run = _assert_recorded_bitwise(path, copies, {n: (lambda c, n=n: c[n])
                                                  for n in ("0.weight", "2.weight")})
    np.testing.assert_array_equal(run.steps, [0, 2, 4, 6, 8])
    _train(compiled, loss_of(compiled), 2, path)  # and the compiled one again
    assert list(spectra.open_run(path).steps[-2:]) == [8, 10]
    _assert_updates_moved(analyze_with_defaults(path))


def test_bf16_weights_are_recorded_exactly_with_their_dtype(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).to(torch.bfloat16)
    g = torch.Generator().manual_seed(0)

    def loss(step):
        return model(torch.randn(8, 8, generator=g).to(torch.bfloat16)).float().pow(2).mean()

    copies = _train(model, loss, 4, tmp_path / "r.zarr", lr=1e-1)
    run = _assert_recorded_bitwise(tmp_path / "r.zarr", copies,
                                   {n: (lambda c, n=n: c[n]) for n in ("0.weight", "2.weight")})
    assert {run.spec(p).dtype for p in run.params} == {"bfloat16"}
    assert np.any(run.updates("0.weight", -1) != 0)  # the bf16 steps moved the weights
    frame = analyze_with_defaults(tmp_path / "r.zarr")
    _assert_updates_moved(frame)


def _lora_gpt2(**options):
    model = _gpt2()
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"],
                             fan_in_fan_out=True, **options)
    return peft.get_peft_model(model, config)


def test_lora_records_the_effective_weight_and_its_update_is_s_b_a(tmp_path):
    model = _lora_gpt2()
    copies = _train(model, _lm_batches(model, 64), 6, tmp_path / "r.zarr", lr=5e-2)
    run = spectra.open_run(tmp_path / "r.zarr")
    adapted = [f"transformer.h.{i}.{p}.weight" for i in range(2) for p in ("attn.c_attn", "mlp.c_fc")]
    assert run.params == adapted  # the 9 frozen base matrices are not recorded
    prefix = "base_model.model."
    for name in adapted:
        layer = name.removesuffix(".weight")
        spec = run.spec(name)
        assert spec.kind == "linear" and spec.attrs["adapter"]["r"] == {"default": 4}
        assert spec.attrs["adapter"]["scaling"] == {"default": 2.0}
        base = copies[0][f"{prefix}{layer}.base_layer.weight"].double()
        np.testing.assert_array_equal(run.init(name), base.T.numpy())  # B_0 = 0: W_0 = base
        for t, step in enumerate(run.steps):
            c = copies[int(step)]
            b = c[f"{prefix}{layer}.lora_B.default.weight"].double()
            a = c[f"{prefix}{layer}.lora_A.default.weight"].double()
            # ΔW_t = s·B_t·A_t, (out, in), to float64 rounding of W_0 + ΔW (the factors trained
            # in float32: peft forms B·A in float32, so allow its rounding too)
            expected = 2.0 * (b @ a)
            tolerance = 1e-6 * max(1.0, float(expected.abs().max()))
            np.testing.assert_allclose(run.updates(name, t), expected.numpy(), rtol=0,
                                       atol=tolerance)
        assert np.abs(run.updates(name, -1)).max() > 1e-3  # the adapter moved
        assert np.linalg.matrix_rank(run.updates(name, -1), tol=1e-6) <= 4
    frame = analyze_with_defaults(tmp_path / "r.zarr")
    _assert_updates_moved(frame)


def test_lora_update_matches_peft_delta_weight_bitwise(tmp_path):
    """Against peft's own get_delta_weight (float32 product), the stored ΔW_t + W_0 is exact."""
    model = _lora_gpt2()
    layer = model.base_model.model.transformer.h[0].mlp.c_fc
    deltas = {}
    batches = _lm_batches(model, 64)

    def loss(step):
        return batches(step)

    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    optimizer.register_step_post_hook(
        lambda *_: deltas.setdefault(len(deltas) + 1, layer.get_delta_weight("default").detach()))
    base = layer.base_layer.weight.detach().double()
    with Recorder(model, tmp_path / "r.zarr", include="*h.0.mlp.c_fc.weight") as rec:
        for step in range(3):
            optimizer.zero_grad()
            loss(step).backward()
            optimizer.step()
            rec.step()
    run = spectra.open_run(tmp_path / "r.zarr")
    assert run.params == ["transformer.h.0.mlp.c_fc.weight"]
    for t in range(1, 4):
        want = (base + deltas[t].double()).T.numpy()
        np.testing.assert_array_equal(run.init(run.params[0]) + run.updates(run.params[0], t),
                                      want)


def test_lora_factors_only_when_named_and_frozen_base_on_request(tmp_path):
    model = _lora_gpt2()
    factors = Recorder(model, tmp_path / "a.zarr", include=["*lora_A*", "*lora_B*"])
    assert len(factors.params) == 8 and all("lora_" in n for n in factors.params)
    everything = Recorder(model, tmp_path / "b.zarr", trainable_only=False)
    assert "transformer.h.0.attn.c_proj.weight" in everything.params
    assert "lm_head.weight" in everything.params
    assert not any("lora_" in n or "base_layer" in n for n in everything.params)


def test_lora_on_a_vit_records_the_trained_classifier_copy_under_its_name(tmp_path):
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                             modules_to_save=["classifier"])
    model = peft.get_peft_model(_vit(), config)
    copies = _train(model, _image_batches(model), 3, tmp_path / "r.zarr")
    run = spectra.open_run(tmp_path / "r.zarr")
    assert run.params == ["vit.layers.0.attention.q_proj.weight",
                          "vit.layers.0.attention.v_proj.weight", "classifier.weight"]
    trained = "base_model.model.classifier.modules_to_save.default.weight"
    for t, step in enumerate(run.steps):
        np.testing.assert_array_equal(run.weights("classifier.weight", t),
                                      copies[int(step)][trained].numpy())
    frame = analyze_with_defaults(tmp_path / "r.zarr")
    _assert_updates_moved(frame)


def test_a_state_dict_read_through_the_shared_rules_matches_the_recorder(tmp_path):
    """What a checkpoint importer does: layers from a model built on the meta device from its
    config, tensors from a state dict, oriented by the same rules as the live Recorder."""
    from spectra.capture import rules
    from spectra.capture.selection import parameter_layers

    model = _gpt2()
    with Recorder(model, tmp_path / "r.zarr"):
        pass
    run = spectra.open_run(tmp_path / "r.zarr")
    with torch.device("meta"):
        skeleton = transformers.GPT2LMHeadModel(model.config)
    layers = parameter_layers(skeleton)
    assert layers["transformer.h.0.attn.c_attn.weight"] == ("transposed_linear", 1)
    state = model.state_dict()
    for name in run.params:
        source = "transformer.wte.weight" if name == "lm_head.weight" else name
        layer, groups = layers[name]
        matrix = rules.as_matrix(state[source], layer, groups)
        np.testing.assert_array_equal(run.init(name), matrix.numpy())

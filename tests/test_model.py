"""The student encoder: parity with transformers' HubertModel, padding,
empty input, gradients, presets, argument round trip, HF folder loading."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from mert_core import model as model_lib
from mert_core.components import ConvLayerBlock, _StridedConvGEMM, dropout, softmax_attention
from mert_core.config import PRESET_NAMES, ModelConfig
from mert_core.convert import HFConversionError, hf_config_from_args, hf_state_dict_to_mert, load_hf_hubert
from mert_core.masking import compute_span_mask
from mert_core.model import MertStudent, StudentOutput, build_student, mert_student, student_args

# Small but complete: the 7-layer conv stack (hop 320), the real positional conv (128 taps, 16 groups).
SMALL = dict(conv_channels=32, embed_dim=64, num_heads=4, ffn_dim=128, num_layers=2)


def small_args(**overrides):
    return student_args("tiny", **{**SMALL, **overrides})


def hf_pair(**overrides):
    """A random transformers HubertModel and our student holding the same weights (eval mode)."""
    transformers = pytest.importorskip("transformers")
    args = small_args(**overrides)
    torch.manual_seed(0)
    theirs = transformers.HubertModel(transformers.HubertConfig(**hf_config_from_args(args))).eval()
    ours = mert_student(**args).eval()
    ours.load_state_dict(hf_state_dict_to_mert(theirs.state_dict(), theirs.config.to_dict()))
    return ours, theirs


def transformers_major() -> int:
    import transformers

    return int(transformers.__version__.split(".")[0])


def assert_hidden_states_match(ours: StudentOutput, theirs, stable: bool, atol: float = 1e-4):
    hf_hidden = theirs.hidden_states
    assert len(ours.hidden_states) == len(hf_hidden)
    for i, (a, b) in enumerate(zip(ours.hidden_states[:-1], hf_hidden[:-1])):
        torch.testing.assert_close(a, b, atol=atol, rtol=0, msg=lambda m: f"hidden state {i}: {m}")
    # transformers >= 5 gives the last layer's raw output; 4.x gave the final LayerNorm's (our last_hidden)
    last_layer = ours.last_hidden if (stable and transformers_major() < 5) else ours.hidden_states[-1]
    torch.testing.assert_close(last_layer, hf_hidden[-1], atol=atol, rtol=0)
    torch.testing.assert_close(ours.last_hidden, theirs.last_hidden_state, atol=atol, rtol=0)


# -- parity with transformers ---------------------------------------------------------------

@pytest.mark.parametrize("stable", [False, True], ids=["post-LN", "pre-LN"])
@pytest.mark.parametrize("channels_last", [True, False], ids=["gemm-convs", "conv1d"])
def test_every_hidden_state_matches_hubert(stable, channels_last):
    ours, theirs = hf_pair(layer_norm_first=stable, attention_relax=32.0 if stable else 0.0)
    ours.feature_extractor.channels_last = channels_last
    wave = torch.randn(2, 8000, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a = ours(wave, output_hidden_states=True)
        b = theirs(wave, output_hidden_states=True)
    assert a.last_hidden.shape == (2, ours.num_frames(8000), 64)
    assert_hidden_states_match(a, b, stable)


@pytest.mark.parametrize("stable", [False, True], ids=["post-LN", "pre-LN"])
def test_masked_frames_match_hubert_mask_time_indices(stable):
    ours, theirs = hf_pair(layer_norm_first=stable)
    wave = torch.randn(2, 8000, generator=torch.Generator().manual_seed(2))
    frames = ours.num_frames(8000)
    mask = compute_span_mask((2, frames), torch.tensor([frames, frames]), 0.8, 5, torch.Generator().manual_seed(3))
    with torch.no_grad():
        a = ours(wave, mask=mask, output_hidden_states=True)
        b = theirs(wave, mask_time_indices=mask, output_hidden_states=True)
        unmasked = ours(wave)
    assert_hidden_states_match(a, b, stable)
    assert torch.equal(a.mask, mask)
    assert not torch.allclose(a.last_hidden, unmasked.last_hidden)


def test_padded_batch_matches_hubert_attention_mask_with_layer_norm_extractor():
    # With a per-frame LayerNorm extractor, transformers' padded batch is exact too: compare valid frames.
    ours, theirs = hf_pair(extractor_norm="layer", conv_bias=True, layer_norm_first=True)
    lengths = torch.tensor([8000, 5000, 2100])
    wave = torch.randn(3, 8000, generator=torch.Generator().manual_seed(4))
    wave[torch.arange(8000)[None, :] >= lengths[:, None]] = 0.0
    attention_mask = (torch.arange(8000)[None, :] < lengths[:, None]).long()
    with torch.no_grad():
        a = ours(wave, lengths)
        b = theirs(wave, attention_mask=attention_mask)
    for i, n in enumerate(ours.num_frames(lengths).tolist()):
        torch.testing.assert_close(a.last_hidden[i, :n], b.last_hidden_state[i, :n], atol=1e-4, rtol=0)


def test_parameter_counts_equal_hubert():
    transformers = pytest.importorskip("transformers")
    for preset, factory in (("95m", model_lib.base_95m), ("330m", model_lib.large_330m)):
        with torch.device("meta"):  # no memory, no init time
            ours = factory()
            theirs = transformers.HubertModel(transformers.HubertConfig(**hf_config_from_args(student_args(preset))))
        count = sum(p.numel() for p in ours.parameters())
        assert count == sum(p.numel() for p in theirs.parameters()), preset
        if preset == "95m":
            assert round(count / 1e6, 2) == 94.37  # MERT-95M's parameter count
        else:
            assert 314e6 < count < 316e6  # MERT-330M: about 315 M


# -- loading Hugging Face folders ------------------------------------------------------------

def test_load_hf_hubert_from_save_pretrained(tmp_path):
    ours, theirs = hf_pair(layer_norm_first=True)
    theirs.save_pretrained(tmp_path)
    loaded = load_hf_hubert(tmp_path)
    assert not loaded.training and loaded.args["layer_norm_first"] is True
    wave = torch.randn(1, 6000)
    with torch.no_grad():
        torch.testing.assert_close(loaded(wave).last_hidden, theirs(wave).last_hidden_state, atol=1e-4, rtol=0)


def test_load_mert_style_folder_with_legacy_weight_norm_names(tmp_path):
    """MERT's files: model_type mert_model, attention_relax, pytorch_model.bin, weight_g/weight_v."""
    ours, theirs = hf_pair()
    sd = {}
    for key, value in theirs.state_dict().items():
        key = key.replace("parametrizations.weight.original0", "weight_g").replace("parametrizations.weight.original1", "weight_v")
        sd[key] = value.clone()
    torch.save(sd, tmp_path / "pytorch_model.bin")
    config = {**theirs.config.to_dict(), "model_type": "mert_model", "architectures": ["MERTModel"],
              "attention_relax": -1.0, "feature_extractor_cqt": False, "deepnorm": False, "sample_rate": 24000}
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = load_hf_hubert(tmp_path)
    wave = torch.randn(2, 4000)
    with torch.no_grad():
        torch.testing.assert_close(loaded(wave).last_hidden, theirs(wave).last_hidden_state, atol=1e-4, rtol=0)


def test_hf_folder_errors(tmp_path):
    with pytest.raises(HFConversionError, match="no config.json"):
        load_hf_hubert(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 768}))
    with pytest.raises(HFConversionError, match=r"model_type 'bert' is not a HuBERT model"):
        load_hf_hubert(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mert_model", "feature_extractor_cqt": True}))
    with pytest.raises(HFConversionError, match="feature_extractor_cqt=True is not supported"):
        load_hf_hubert(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "hubert"}))
    with pytest.raises(HFConversionError, match="no model.safetensors or pytorch_model.bin"):
        load_hf_hubert(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"truncated")
    with pytest.raises(HFConversionError, match="cannot read the weights"):
        load_hf_hubert(tmp_path)
    assert issubclass(HFConversionError, ValueError)


def test_weights_that_do_not_match_the_config_are_refused(tmp_path):
    _, theirs = hf_pair()
    sd = theirs.state_dict()
    with pytest.raises(HFConversionError, match="encoder layers"):
        hf_state_dict_to_mert(sd, {**theirs.config.to_dict(), "num_hidden_layers": 1})
    with pytest.raises(HFConversionError, match="not a HubertModel state dict"):
        hf_state_dict_to_mert({"bert.embeddings.weight": torch.zeros(1)}, {})


# -- padding, empty input, bad input ---------------------------------------------------------

@pytest.mark.parametrize("channels_last", [True, False], ids=["gemm-convs", "conv1d"])
def test_padded_batch_equals_items_one_at_a_time(channels_last):
    student = mert_student(**small_args(layer_norm_first=False)).eval()
    student.feature_extractor.channels_last = channels_last
    lengths = torch.tensor([9000, 6001, 2345, 399, 0])
    wave = torch.randn(5, 9000, generator=torch.Generator().manual_seed(5))
    wave[1, 6001:] = 100.0  # junk in the padding must not matter
    frames = student.num_frames(lengths)
    with torch.no_grad():
        batch = student(wave, lengths, output_hidden_states=True)
        assert torch.equal(batch.padding_mask, torch.arange(batch.last_hidden.shape[1])[None, :] >= frames[:, None])
        assert all(torch.isfinite(h).all() for h in batch.hidden_states)
        penalties, counts = [], []
        for i, n in enumerate(frames.tolist()):
            if n == 0:
                continue
            alone = student(wave[i : i + 1, : int(lengths[i])], output_hidden_states=True)
            for h_batch, h_alone in zip(batch.hidden_states, alone.hidden_states):
                torch.testing.assert_close(h_batch[i, :n], h_alone[0], atol=1e-5, rtol=1e-5)
            penalties.append(alone.features_penalty)
            counts.append(n)
    weighted = sum(p * c for p, c in zip(penalties, counts)) / sum(counts)
    torch.testing.assert_close(batch.features_penalty, weighted, atol=1e-6, rtol=1e-5)


def test_zero_length_and_too_short_input_give_empty_outputs():
    student = model_lib.tiny().eval()
    for samples in (0, 1, student.receptive_field - 1):
        out = student(torch.zeros(2, samples), output_hidden_states=True)
        assert out.last_hidden.shape == (2, 0, student.embed_dim)
        assert len(out.hidden_states) == student.num_layers + 1
        assert all(h.shape == (2, 0, student.embed_dim) for h in out.hidden_states)
        assert out.padding_mask.shape == (2, 0) and float(out.features_penalty) == 0.0
    assert student(torch.zeros(1, student.receptive_field)).last_hidden.shape == (1, 1, student.embed_dim)
    assert student.num_frames(0) == 0 and student.num_frames(399) == 0 and student.num_frames(400) == 1
    assert student.num_frames(120000) == 374  # MERT: 5 s at 75 Hz
    # 5.12 s = 122880 samples is 384 hops but 383 frames: frame n needs 400 + 320 (n - 1) samples
    assert student.num_frames(torch.tensor([0, 400, 720, 122880, 122960])).tolist() == [0, 1, 2, 383, 384]


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda s: s(torch.zeros(1000)), r"wave: expected a float tensor of shape \(batch, samples\), got torch.float32 \(1000,\)"),
        (lambda s: s(torch.zeros(2, 1000, dtype=torch.long)), r"wave: expected a float tensor"),
        (lambda s: s(torch.zeros(2, 1000), torch.tensor([1000, 1001])), r"lengths: expected values in \[0, 1000\]"),
        (lambda s: s(torch.zeros(2, 1000), torch.tensor([1000])), r"lengths: expected an integer tensor of shape \(2,\)"),
        (lambda s: s(torch.zeros(2, 1000), torch.tensor([1000.0, 5.0])), r"lengths: expected an integer tensor"),
        (lambda s: s(torch.zeros(2, 1000), mask=torch.zeros(2, 5, dtype=torch.bool)), r"mask: expected a bool tensor of shape \(2, 2\) for 1000 samples, got torch.bool \(2, 5\)"),
    ],
)
def test_bad_input_gives_one_line_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call(model_lib.tiny())


# -- training behaviour ------------------------------------------------------------------------

def _no_dropout(**overrides):
    quiet = dict(dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, input_dropout=0.0, layerdrop=0.0)
    return small_args(**{**quiet, **overrides})


def test_feature_grad_mult_scales_only_the_conv_gradients():
    torch.manual_seed(0)
    full = mert_student(**_no_dropout(feature_grad_mult=1.0))
    scaled = mert_student(**_no_dropout(feature_grad_mult=0.1))
    frozen = mert_student(**_no_dropout(feature_grad_mult=0.0))
    scaled.load_state_dict(full.state_dict())
    frozen.load_state_dict(full.state_dict())
    wave = torch.randn(2, 4000)
    for m in (full, scaled, frozen):
        out = m(wave)
        (out.last_hidden.square().mean() + 10 * out.features_penalty).backward()
    for (name, p_full), p_scaled, p_frozen in zip(full.named_parameters(), scaled.parameters(), frozen.parameters()):
        if name.startswith("feature_extractor."):
            torch.testing.assert_close(p_scaled.grad, 0.1 * p_full.grad, atol=1e-7, rtol=1e-4)
            assert p_frozen.grad is None
        elif p_full.grad is not None:
            torch.testing.assert_close(p_scaled.grad, p_full.grad, atol=1e-7, rtol=1e-5)


def test_layerdrop_applies_in_training_only():
    student = mert_student(**_no_dropout(layerdrop=1.0))
    wave = torch.randn(1, 4000)
    student.train()
    out = student(wave, output_hidden_states=True)
    assert all(torch.equal(h, out.hidden_states[0]) for h in out.hidden_states)  # every layer skipped
    student.eval()
    reference = mert_student(**_no_dropout(layerdrop=0.0)).eval()
    reference.load_state_dict(student.state_dict())
    with torch.no_grad():
        out = student(wave, output_hidden_states=True)
        assert not torch.equal(out.hidden_states[1], out.hidden_states[0])
        # bitwise: in eval mode layerdrop is off, so both run the same layers on the same input
        torch.testing.assert_close(out.last_hidden, reference(wave).last_hidden, atol=0, rtol=0)


def test_dropout_is_off_in_eval_and_seeded_in_training():
    student = model_lib.tiny()
    wave = torch.randn(1, 4000)
    student.eval()
    with torch.no_grad():
        assert torch.equal(student(wave).last_hidden, student(wave).last_hidden)
    student.train()
    torch.manual_seed(3)
    a = student(wave).last_hidden
    torch.manual_seed(3)
    b = student(wave).last_hidden
    torch.manual_seed(4)
    c = student(wave).last_hidden
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_cpu_dropout_keeps_the_right_fraction_and_gradient():
    torch.manual_seed(0)
    x = torch.ones(400_000, requires_grad=True)
    y = dropout(x, 0.1, training=True)
    kept = y != 0
    assert abs(kept.float().mean().item() - 0.9) < 0.003
    torch.testing.assert_close(y[kept], torch.full_like(y[kept], 1 / 0.9))
    y.sum().backward()
    assert torch.equal(x.grad != 0, kept)
    assert torch.equal(dropout(x, 0.1, training=False), x)


def test_attention_written_out_matches_sdpa_and_relaxation_survives_fp16():
    g = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(2, 4, 20, 32, generator=g) for _ in range(3))
    attend = torch.ones(2, 1, 1, 20, dtype=torch.bool)
    attend[1, ..., 13:] = False
    reference = F.scaled_dot_product_attention(q, k, v, attn_mask=attend)
    torch.testing.assert_close(softmax_attention(q, k, v, attend), reference, atol=1e-5, rtol=0)
    torch.testing.assert_close(softmax_attention(q, k, v, attend, relax=32.0), reference, atol=1e-5, rtol=0)
    # scores far beyond fp16's range: plain fp16 scores overflow, relaxed ones do not
    qb, kb = q * 60, k * 60
    exact = F.scaled_dot_product_attention(qb.double(), kb.double(), v.double(), attn_mask=attend)
    assert not torch.isfinite(torch.matmul(qb.half(), kb.half().transpose(-2, -1))).all()
    relaxed = softmax_attention(qb.half(), kb.half(), v.half(), attend, relax=32.0)
    torch.testing.assert_close(relaxed.double(), exact, atol=5e-3, rtol=0)


@pytest.mark.parametrize("kernel_size,stride", [(3, 2), (2, 2), (10, 5), (3, 1), (2, 3), (7, 3)])
def test_strided_conv_as_gemms_matches_conv1d_with_gradients(kernel_size, stride):
    g = torch.Generator().manual_seed(kernel_size * 10 + stride)
    x = torch.randn(2, 23, 3, dtype=torch.double, generator=g, requires_grad=True)  # B, T, C
    w = torch.randn(4, 3, kernel_size, dtype=torch.double, generator=g, requires_grad=True)
    reference = F.conv1d(x.transpose(1, 2), w, stride=stride).transpose(1, 2)
    torch.testing.assert_close(_StridedConvGEMM.apply(x, w, stride), reference)
    assert torch.autograd.gradcheck(lambda x, w: _StridedConvGEMM.apply(x, w, stride), (x, w), fast_mode=True)
    block = ConvLayerBlock(3, 4, kernel_size, stride, bias=True, norm="layer").double()
    lengths = torch.tensor([23, 17])
    y_last, n_last = block(x, lengths, channels_last=True)
    y_first, n_first = block(x.transpose(1, 2), lengths, channels_last=False)
    torch.testing.assert_close(y_last, y_first.transpose(1, 2))
    assert torch.equal(n_last, n_first)


def test_backward_paths_agree_between_conv_layouts():
    torch.manual_seed(0)
    a = mert_student(**_no_dropout())
    b = mert_student(**_no_dropout())
    b.load_state_dict(a.state_dict())
    a.feature_extractor.channels_last, b.feature_extractor.channels_last = True, False
    wave = torch.randn(2, 5000)
    lengths = torch.tensor([5000, 3000])
    for m in (a, b):
        out = m(wave, lengths)
        (out.last_hidden[~out.padding_mask].square().mean() + out.features_penalty).backward()
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, atol=1e-5, rtol=1e-3, msg=lambda m: f"{name}: {m}")


# -- presets, arguments, config ----------------------------------------------------------------

def test_args_round_trip_through_json():
    student = model_lib.tiny(num_layers=3)
    args = json.loads(json.dumps(student.args))
    rebuilt = MertStudent.from_args(args)
    rebuilt.load_state_dict(student.state_dict())
    assert rebuilt.args == student.args and rebuilt.num_layers == 3
    wave = torch.randn(1, 3000)
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(wave).last_hidden, student.eval()(wave).last_hidden)  # same weights, same computation
    assert set(student.args) == set(model_lib.STUDENT_ARG_NAMES)


def test_tiny_preset_is_small_and_keeps_the_real_hop():
    student = model_lib.tiny()
    assert student.hop_samples == 320 and student.receptive_field == 400
    assert len(student.feature_extractor.conv_layers) == 7
    assert sum(p.numel() for p in student.parameters()) < 2_000_000
    assert student.sample_rate == 24000


def test_small_presets_share_a_transformer_and_differ_in_the_front_end():
    """``small`` is the paper's conv stack at 256 channels under 4 x 256 layers; ``cpu-small`` the
    same transformer on the ``cpu`` preset's filter bank (docs/scaling.md)."""
    small, cpu_small = model_lib.mert_student(**student_args("small")), model_lib.mert_student(**student_args("cpu-small"))
    assert (small.num_layers, small.embed_dim) == (cpu_small.num_layers, cpu_small.embed_dim) == (4, 256)
    assert [c.conv.kernel_size[0] for c in small.feature_extractor.conv_layers] == [10, 3, 3, 3, 3, 2, 2]
    assert small.geometry.receptive_field == 400 and small.geometry.lead_frames == 0
    assert cpu_small.geometry.receptive_field == 1840 and cpu_small.geometry.lead_frames == 2
    assert small.hop_samples == cpu_small.hop_samples == 320
    assert 4e6 < sum(p.numel() for p in small.parameters()) < 6e6
    wave = torch.randn(2, 24000)
    with torch.no_grad():
        assert small.eval()(wave).last_hidden.shape == (2, small.num_frames(24000), 256)
        assert cpu_small.eval()(wave).last_hidden.shape == (2, cpu_small.num_frames(24000), 256)


def test_build_student_reads_the_config_and_names_bad_overrides():
    student = build_student(ModelConfig(preset="tiny", overrides={"num_layers": 3, "embed_dim": 96, "num_heads": 3}))
    assert student.num_layers == 3 and student.embed_dim == 96
    with pytest.raises(ValueError, match=r"config field 'model.overrides': 'num_layer' is not a student argument; valid names: conv_channels"):
        build_student(ModelConfig(preset="tiny", overrides={"num_layer": 3}))
    with pytest.raises(ValueError, match=r"config field 'model.overrides'.*embed_dim 100 must be divisible by num_heads 3"):
        build_student(ModelConfig(preset="tiny", overrides={"embed_dim": 100, "num_heads": 3}))
    with pytest.raises(ValueError, match=r"student override 'depth' is not a student argument"):
        model_lib.tiny(depth=2)
    with pytest.raises(ValueError, match=r"MertStudent.from_args: unknown argument 'depth'"):
        MertStudent.from_args({**model_lib.tiny().args, "depth": 2})


def test_every_preset_name_has_a_builder_and_the_cli_offers_each():
    from mert_cli.main import cli

    assert tuple(model_lib.PRESETS) == PRESET_NAMES  # the config's Literal, the CLI choices and the builders agree
    for command in ("train", "ablate", "eval"):
        (option,) = [p for p in cli.commands[command].params if p.name == "preset"]
        assert tuple(option.type.choices) == PRESET_NAMES


def test_presets_follow_the_spec():
    base, large = student_args("95m"), student_args("330m")
    assert (base["embed_dim"], base["num_layers"], base["num_heads"], base["ffn_dim"]) == (768, 12, 12, 3072)
    assert (large["embed_dim"], large["num_layers"], large["num_heads"], large["ffn_dim"]) == (1024, 24, 16, 4096)
    assert not base["layer_norm_first"] and large["layer_norm_first"]
    assert base["feature_grad_mult"] == 0.1 and large["feature_grad_mult"] == 1.0
    assert base["layerdrop"] == 0.05 and base["dropout"] == base["attention_dropout"] == base["input_dropout"] == 0.1
    assert large["dropout"] == large["attention_dropout"] == large["layerdrop"] == 0.0
    assert large["attention_relax"] == 32.0 and base["attention_relax"] == 0.0
    for args in (base, large):
        assert args["conv_kernels"] == [10, 3, 3, 3, 3, 2, 2] and args["conv_strides"] == [5, 2, 2, 2, 2, 2, 2]
        assert args["conv_channels"] == 512 and not args["conv_bias"] and args["extractor_norm"] == "group"
        assert (args["pos_conv_kernel"], args["pos_conv_groups"]) == (128, 16)
        assert math.prod(args["conv_strides"]) == 320


def test_every_preset_names_its_head_projection_size():
    from mert_core.model import PRESET_FINAL_DIMS, PRESETS

    assert set(PRESET_FINAL_DIMS) == set(PRESETS)
    assert (PRESET_FINAL_DIMS["95m"], PRESET_FINAL_DIMS["330m"]) == (64, 128)  # MERT base / large

"""The rvq-vae teacher: EnCodec codes, weights loading, framing, codebook choice.

The official weights are CC-BY-NC and never downloaded: every test saves a
randomly initialised 24 kHz model in the official file format and loads it
through the teacher's own code path. The reference is encodec's own
``EncodecModel.encode`` on the full model.

Codes are compared bitwise only where both sides run the same computation
(same input shapes, same kernels). Where the batch shape or the length differs,
float rounding can flip a code at a near-tie, so the comparison allows exactly
that (``assert_equal_up_to_ties``; the bound is in docs/rvq_vae_mixup.md).
"""

from __future__ import annotations

import shutil
import warnings

import numpy as np
import pytest
import torch
from conftest import MAX_FLIPPED_FRAMES, TIE_MARGIN, music, threads, tie_margin

from mert_core.geometry import FrameGeometry
from mert_core.registry import PluginError, load_registry
from mert_core.teacher import IGNORE_LABEL
from mert_plugins.teachers.rvq_vae import (
    CHECKPOINT_NAME,
    CHECKPOINT_URL,
    EncodecWeightsError,
    RVQVAETeacher,
    save_random_weights,
)

SR, HOP = 24000, 320


def student_frames(num_samples: int) -> int:
    return (num_samples - 400) // 320 + 1


def batch(seconds: float, seeds=(1, 2, 3)) -> torch.Tensor:
    """(B, S) music-like test signals."""
    return torch.from_numpy(np.stack([music(seconds, SR, s) for s in seeds]))


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """EnCodec's small convolutions and LSTM gain little from a second thread on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads(1))
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def registry():
    return load_registry()


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return save_random_weights(tmp_path_factory.mktemp("encodec") / CHECKPOINT_NAME, seed=0)


@pytest.fixture(scope="module")
def other_weights(weights):
    """The same file format with one tensor changed: other weights."""
    state = torch.load(weights, map_location="cpu")
    key = next(k for k in state if k.endswith("_codebook.embed"))
    state[key] = state[key] + 1e-3
    path = weights.parent / "other.th"
    torch.save(state, path)
    return path


@pytest.fixture(scope="module")
def teacher(registry, weights):
    return registry.build("teacher", "rvq-vae", {"weights_path": str(weights)})


@pytest.fixture(scope="module")
def teacher_1_5(registry, weights):
    return registry.build("teacher", "rvq-vae", {"weights_path": str(weights), "codebooks": [1, 5]})


@pytest.fixture(scope="module")
def other_teacher(registry, other_weights):
    return registry.build("teacher", "rvq-vae", {"weights_path": str(other_weights)})


@pytest.fixture(scope="module")
def reference(weights):
    """encodec's own model, loaded the way encodec loads a checkpoint."""
    from encodec import EncodecModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        model = EncodecModel.encodec_model_24khz(pretrained=False)
    model.load_state_dict(torch.load(weights, map_location="cpu"))
    model.set_target_bandwidth(6.0)
    model.eval()

    def encode(wave: torch.Tensor, clips_per_call: int = 1) -> torch.Tensor:  # B, S -> B, T, 8
        """One clip per call by default, like the teacher on CPU: the same computation, shape for shape."""
        codes = []
        for chunk in wave.split(clips_per_call):
            with torch.no_grad():
                frames = model.encode(chunk.unsqueeze(1))
            assert len(frames) == 1 and frames[0][1] is None  # one segment, no normalisation (24 kHz model)
            codes.append(frames[0][0].transpose(1, 2))
        return torch.cat(codes)

    return encode


def assert_equal_up_to_ties(teacher, wave, want, got):
    """``got`` equals ``want`` but for codes flipped at a near-tie by float rounding.

    In a frame whose codes differ, the first differing codebook must be a
    near-tie for the residual of ``want``'s path: its two codes are within
    ``TIE_MARGIN`` x |encoder output| of the hyperplane halfway between them.
    The later codebooks of that frame quantize another residual and may differ.
    At most ``MAX_FLIPPED_FRAMES`` of the frames differ.

    Args:
        teacher: the rvq-vae teacher that made both.
        wave: ``(B, S)`` the audio ``want`` was encoded from, clip by clip.
        want, got: ``(B, T, 8)`` codes.
    """
    assert got.shape == want.shape
    flipped = (got != want).any(-1)  # B, T
    assert flipped.float().mean() <= MAX_FLIPPED_FRAMES, f"{int(flipped.sum())} of {flipped.numel()} frames differ"
    books = [layer._codebook.embed for layer in teacher.codec.quantizer.vq.layers[: want.shape[-1]]]  # 1024, D each
    with torch.no_grad():
        emb = torch.cat([teacher.codec.encoder(clip[None, None].float()) for clip in wave])  # B, D, T + (0 or 1)
    for b, t in flipped.nonzero().tolist():
        k = int((got[b, t] != want[b, t]).nonzero()[0])
        x = emb[b, :, t].double()
        residual = x - sum((books[j][want[b, t, j]].double() for j in range(k)), torch.zeros_like(x))
        margin = tie_margin(residual, books[k][want[b, t, k]], books[k][got[b, t, k]]) / float(x.norm())
        assert margin <= TIE_MARGIN, (
            f"clip {b} frame {t} codebook {k}: code {int(want[b, t, k])} became {int(got[b, t, k])}, "
            f"{margin:.1e} x |encoder output| from a tie (allowed: {TIE_MARGIN:g})"
        )


def test_registered_with_spec(registry, teacher):
    assert "rvq-vae" in registry.names("teacher")
    assert isinstance(teacher, RVQVAETeacher)
    spec = teacher.target_spec()
    assert (spec.kind, spec.num_codebooks, spec.num_classes, spec.frame_rate_hz) == ("discrete", 8, 1024, 75.0)
    assert not any(p.requires_grad for p in teacher.parameters())
    teacher.train()
    assert not teacher.codec.training  # the codec stays in eval mode


def test_codes_match_encodec_reference(teacher, reference):
    wave = batch(0.6)  # 14400 samples: a multiple of the hop
    got = teacher.targets(wave)
    want = reference(wave)
    assert got.dtype == torch.int64 and got.shape == (3, 45, 8)
    assert torch.equal(got, want)  # bitwise: the same modules on the same (1, 1, S) inputs
    # the random weights still give varied codes, so the comparison means something
    assert all(got[..., k].unique().numel() >= 5 for k in range(8))
    # the batched path against encodec batched the same way: the same (3, 1, S) input, so bitwise too
    options = teacher.Options(weights_path=teacher.options.weights_path, clips_per_call=3)
    assert torch.equal(_with_options(teacher, options).targets(wave), reference(wave, clips_per_call=3))


@pytest.mark.parametrize("num_samples", [12800, 12800 + 17, 12800 + 100, 12800 + 319, 400, 320])
def test_partial_last_frame_dropped(teacher, reference, num_samples):
    wave = batch(num_samples / SR + 0.01, seeds=(1, 2))[:, :num_samples]
    got = teacher.targets(wave)
    whole = reference(wave)  # encodec pads the tail: ceil(S / 320) frames
    assert whole.shape[1] == -(-num_samples // HOP)
    assert got.shape == (2, num_samples // HOP, 8)
    assert torch.equal(got, whole[:, : got.shape[1]])  # bitwise: the same computation, clip by clip


@pytest.mark.parametrize("num_samples", [120000, 122880, 12800, 12800 + 17, 12800 + 100, 400, 320, 100, 0])
def test_frame_count_within_one_of_student(teacher, num_samples):
    wave = 0.1 * torch.randn(1, num_samples, generator=torch.Generator().manual_seed(0))
    got = teacher.targets(wave)
    assert got.shape == (1, num_samples // HOP, 8)
    assert got.shape[1] - max(0, student_frames(num_samples)) in (0, 1)
    if num_samples == 120000:  # the 5 s crop: EnCodec 375 frames, student 374
        assert (got.shape[1], student_frames(num_samples)) == (375, 374)


def test_batch_equals_one_at_a_time(teacher):
    """On CPU the teacher encodes clip by clip by default, so its codes never
    depend on the batch (bitwise: each clip goes through the same (1, 1, S)
    computation whatever its neighbours); batched encoding (clips_per_call)
    runs other kernels and agrees up to near-ties."""
    wave = batch(0.6, seeds=(4, 5, 6, 7, 8))
    alone = torch.cat([teacher.targets(wave[i : i + 1]) for i in range(len(wave))])
    assert torch.equal(teacher.targets(wave), alone)
    for order in ([4, 0, 2], [3, 1], [2, 2, 2]):  # other batch compositions
        assert torch.equal(teacher.targets(wave[order]), alone[order])
    for per_call in (2, 5):  # uneven and whole-batch chunks
        options = teacher.Options(weights_path=teacher.options.weights_path, clips_per_call=per_call)
        assert_equal_up_to_ties(teacher, wave, alone, _with_options(teacher, options).targets(wave))


def test_tie_check_refuses_codes_that_are_no_tie(teacher):
    """The tie-aware comparison is not a blank cheque: a code changed away from a tie fails it."""
    wave = batch(0.6, seeds=(4, 5))
    want = teacher.targets(wave)
    got = want.clone()
    got[1, 10, 0] = (got[1, 10, 0] + 1) % 1024
    with pytest.raises(AssertionError, match="from a tie"):
        assert_equal_up_to_ties(teacher, wave, want, got)
    many = want.clone()
    many[0, :, 7] = (many[0, :, 7] + 1) % 1024
    with pytest.raises(AssertionError, match="frames differ"):
        assert_equal_up_to_ties(teacher, wave, want, many)


def test_padding_does_not_change_codes_of_real_frames(teacher):
    """Short files are zero-padded in a batch; EnCodec is causal (apart from
    reflect padding at the very start), so their codes on full frames equal the
    codes of the unpadded clip, up to near-ties (the lengths differ, and so
    may the kernels and their rounding)."""
    wave = batch(0.6, seeds=(8, 9))
    valid = 9600 + 160
    padded = wave.clone()
    padded[1, valid:] = 0
    got = teacher.targets(padded)[1:2, : valid // HOP]
    assert_equal_up_to_ties(teacher, wave[1:2, :valid], teacher.targets(wave[1:2, :valid]), got)


def test_chunked_encoding_differs_so_the_window_rule_matters(teacher):
    """Why the chunk rule exists: codes of the second half encoded alone differ
    from the same frames of the whole clip (EnCodec's LSTM carries state)."""
    wave = batch(0.8, seeds=(10,))
    whole = teacher.targets(wave)[:, 30:]
    second = teacher.targets(wave[:, 9600:])
    assert whole.shape == second.shape
    assert not torch.equal(whole, second)


def test_autocast_and_dtype_do_not_change_codes(teacher):
    wave = batch(0.4, seeds=(11, 12))
    want = teacher.targets(wave)
    # bitwise: the teacher switches autocast off, and float64 -> float32 gives back the same float32 input
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(teacher.targets(wave), want)
    assert torch.equal(teacher.targets(wave.double()), want)


def test_chosen_codebooks(teacher, teacher_1_5):
    wave = batch(0.4, seeds=(13, 14))
    full = teacher.targets(wave)
    got = teacher_1_5.targets(wave)  # the same codes computed the same way, then selected: bitwise
    assert got.shape == full.shape
    assert torch.equal(got[..., [1, 5]], full[..., [1, 5]])
    assert (got[..., [0, 2, 3, 4, 6, 7]] == IGNORE_LABEL).all()
    for keep in ([0], [7]):  # the paper's single-codebook ablations
        options = teacher.Options(weights_path=teacher.options.weights_path, codebooks=keep)
        single = teacher.__class__.select_codebooks(_with_options(teacher, options), full)
        assert torch.equal(single[..., keep], full[..., keep])
        assert (single[..., [k for k in range(8) if k not in keep]] == IGNORE_LABEL).all()


def _with_options(teacher, options):
    """A stand-in sharing the teacher's state with other options (no second codec build)."""
    clone = object.__new__(type(teacher))
    clone.__dict__.update(teacher.__dict__)
    clone.options = options
    return clone


def test_random_codebook_per_batch(registry, weights, teacher):
    wave = batch(0.4, seeds=(15, 16))
    full = teacher.targets(wave)
    t = registry.build("teacher", "rvq-vae", {"weights_path": str(weights), "codebooks": "random", "seed": 3})
    got = t.targets(wave, generator=torch.Generator().manual_seed(0))  # what the trainer does each step
    kept = [k for k in range(8) if (got[..., k] != IGNORE_LABEL).any()]
    assert len(kept) == 1  # one codebook for the whole batch, the others ignored
    assert torch.equal(got[..., kept[0]], full[..., kept[0]])
    assert (got[..., [k for k in range(8) if k != kept[0]]] == IGNORE_LABEL).all()

    def drawn(generator) -> int:
        got = t.select_codebooks(full, generator)
        kept = [k for k in range(8) if (got[..., k] != IGNORE_LABEL).any()]
        assert len(kept) == 1
        return kept[0]

    draws = [drawn(torch.Generator().manual_seed(seed)) for seed in range(40)]
    assert draws == [drawn(torch.Generator().manual_seed(seed)) for seed in range(40)]  # deterministic under the seed
    assert len(set(draws)) >= 5  # and spread over the 8 codebooks
    # without a generator: a fixed stream from a CPU generator seeded with options.seed
    seeded = torch.Generator().manual_seed(3)
    expected = [int(torch.randint(8, (1,), generator=seeded)) for _ in range(10)]
    assert [int((t.select_codebooks(full) != IGNORE_LABEL).any(1).any(0).nonzero()) for _ in range(10)] == expected


@pytest.mark.parametrize("bad", [[8], [], [0, 0], "some", [-1]])
def test_bad_codebooks_option(registry, weights, bad):
    with pytest.raises(PluginError, match="codebooks"):
        registry.build("teacher", "rvq-vae", {"weights_path": str(weights), "codebooks": bad})


def test_missing_weights_message(registry, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    hub_file = tmp_path / "torch" / "hub" / "checkpoints" / CHECKPOINT_NAME
    # nothing given, nothing cached
    with pytest.raises(EncodecWeightsError) as info:
        registry.build("teacher", "rvq-vae", {})
    msg = str(info.value)
    assert "\n" not in msg
    for needed in (str(hub_file), CHECKPOINT_NAME, CHECKPOINT_URL, "CC-BY-NC", "weights_path"):
        assert needed in msg
    # a path given that does not exist: both paths named
    missing = tmp_path / "nowhere" / "encodec.th"
    with pytest.raises(EncodecWeightsError) as info:
        registry.build("teacher", "rvq-vae", {"weights_path": str(missing)})
    msg = str(info.value)
    assert str(missing) in msg and str(hub_file) in msg and "CC-BY-NC" in msg and "\n" not in msg


def test_loads_from_torch_hub_cache_and_folder(registry, weights, teacher, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    hub_file = tmp_path / "torch" / "hub" / "checkpoints" / CHECKPOINT_NAME
    hub_file.parent.mkdir(parents=True)
    shutil.copy(weights, hub_file)
    wave = batch(0.2, seeds=(17,))
    from_cache = registry.build("teacher", "rvq-vae", {})
    assert from_cache.weights_file == hub_file
    assert torch.equal(from_cache.targets(wave), teacher.targets(wave))  # same bytes, same computation
    from_folder = registry.build("teacher", "rvq-vae", {"weights_path": str(hub_file.parent)})
    assert from_folder.weights_file == hub_file


def test_never_downloads(registry, weights, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("tried to download")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_network)
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    registry.build("teacher", "rvq-vae", {"weights_path": str(weights)}).targets(batch(0.2, seeds=(1,)))


def test_wrong_or_corrupt_checkpoint(registry, weights, tmp_path):
    state = torch.load(weights, map_location="cpu")
    cases = {}
    partial = dict(state)
    partial.pop(next(iter(partial)))
    partial["lm.extra.weight"] = torch.zeros(3)
    cases["missing keys"] = partial
    reshaped = dict(state)
    key = next(k for k in state if k.endswith("_codebook.embed"))
    reshaped[key] = torch.zeros(512, 128)
    cases["wrong shape"] = reshaped
    for what, sd in cases.items():
        path = tmp_path / f"{what.replace(' ', '_')}.th"
        torch.save(sd, path)
        with pytest.raises(EncodecWeightsError, match="not an EnCodec 24 kHz checkpoint") as info:
            registry.build("teacher", "rvq-vae", {"weights_path": str(path)})
        assert str(path) in str(info.value)
    corrupt = tmp_path / "corrupt.th"
    corrupt.write_bytes(weights.read_bytes()[:5000])
    with pytest.raises(EncodecWeightsError, match="cannot read") as info:
        registry.build("teacher", "rvq-vae", {"weights_path": str(corrupt)})
    assert str(corrupt) in str(info.value)


def test_wrong_sample_rate(registry, weights):
    with pytest.raises(ValueError, match="24000 Hz"):
        registry.build("teacher", "rvq-vae", {"weights_path": str(weights)}, geometry=FrameGeometry(16000, 320))


def test_config_hash_follows_weights_content(registry, weights, other_teacher, teacher, teacher_1_5, tmp_path):
    copy = tmp_path / "elsewhere.th"
    shutil.copy(weights, copy)
    moved = registry.build("teacher", "rvq-vae", {"weights_path": str(copy)})
    assert moved.config_hash() == teacher.config_hash()  # same bytes, other place: same labels
    assert other_teacher.config_hash() != teacher.config_hash()
    # the codebook choice is applied after the codes: one label store serves every ablation
    assert teacher_1_5.config_hash() == teacher.config_hash()


def test_online_codes_equal_offline_label_store(teacher, other_teacher, teacher_1_5, tmp_path):
    """`mert teacher label rvq-vae` and online targets give the same codes: the
    store labels each grid window alone, the trainer's grid-aligned crop is that
    window, and batching does not change the codes. Bitwise: on CPU both sides
    encode each window alone, the same (1, 1, S) computation."""
    import soundfile as sf

    from mert_core.audio import read_crop
    from mert_core.labels import LabelStore, LabelStoreMismatch, student_frames, write_label_store

    window = 12800  # stands in for the 5 s crop; the rule does not depend on the size
    files = []
    for i, seconds in enumerate((1.3, 1.1, 0.6)):  # 2, 2 and 1 full windows, each + a partial one
        path = tmp_path / "audio" / f"{i}.wav"
        path.parent.mkdir(exist_ok=True)
        sf.write(path, music(seconds, SR, 20 + i), SR)
        files.append(str(path.resolve()))
    write_label_store(teacher, files, tmp_path / "store", window_samples=window, batch_size=3, progress=False)
    store = LabelStore.open(tmp_path / "store")
    store.check(teacher, window_samples=window)

    # every full window, batched across files like a training batch
    crops = [(p, off) for p in files for off in range(0, sf.info(p).frames - window + 1, window)]
    wave = torch.from_numpy(np.stack([read_crop(p, SR, off, window) for p, off in crops]))
    num_frames = student_frames(window)
    online = teacher.targets(wave)[:, :num_frames]  # the core drops EnCodec's extra frame
    offline = store.targets([p for p, _ in crops], [off for _, off in crops], num_frames)
    assert len(crops) == 5 and torch.equal(online, offline)
    # the partial last windows, labelled at their own length
    for p in files:
        n = sf.info(p).frames
        off = (n // window) * window
        if n - off >= 400:
            got = teacher.targets(torch.from_numpy(read_crop(p, SR, off, window))[None])
            assert torch.equal(torch.from_numpy(store.window(p, off).astype(np.int64)), got[0, : len(store.window(p, off))])
    # a store made with other weights is refused
    with pytest.raises(LabelStoreMismatch, match="configuration"):
        store.check(other_teacher, window_samples=window)
    # the same store serves a codebook ablation: stored codes, then this teacher's selection
    store.check(teacher_1_5, window_samples=window)
    chosen = teacher_1_5.targets_from_store(offline)
    assert torch.equal(chosen, teacher_1_5.targets(wave)[:, :num_frames])
    assert (chosen[..., [1, 5]] >= 0).all() and (chosen[..., [0, 2, 3, 4, 6, 7]] == -1).all()

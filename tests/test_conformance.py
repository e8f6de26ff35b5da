"""The conformance kit (:mod:`mert_core.testing`) run on every registered plugin.

One parametrised test per plugin kind over every name the registry holds (the
built-ins, loaded through their entry points like any installed plugin), and for
teachers over the frame geometry of every student preset: a check that only
some plugins pass through proves nothing about the others.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mert_core.checkpoint import save_student
from mert_core.model import PRESETS, mert_student, student_args, tiny
from mert_core.registry import load_registry
from mert_core.testing import check_augment, check_task, check_teacher, write_test_audio

REGISTRY = load_registry()

# Options that make each built-in teacher cheap to fit and run; a teacher not listed (a third-party
# one installed next to mert) is checked with its defaults.
SMALL_TEACHER_OPTIONS: dict[str, dict] = {
    "kmeans-mfcc": {"n_clusters": 12, "n_mels": 40},
    "kmeans-logmel-chroma": {"n_clusters_logmel": 6, "n_clusters_chroma": 5, "n_mels": 32},
    "kmeans-hidden": {"layer": 1, "n_clusters": 6},
    "best-rq": {"n_mels": 32, "n_fft": 1024, "codebook_size": 64, "num_codebooks": 2, "codebook_dim": 8},
    "mel-rvq": {"n_mels": 16, "n_fft": 1024, "stack_frames": 2, "num_codebooks": 2, "codebook_size": 16, "codebook_dim": 4,
                "batch_frames": 256, "init_frames": 400, "dead_code_steps": 5, "eval_frames": 400, "steps": 20,
                "checkpoint_every": 10, "log_every": 10},
    "cqt": {"normalize": "per-bin"},  # the fitted variant: covers fit() too
    "ema": {"top_k": 2},
}


def _preset_geometries() -> dict[str, tuple]:
    """Each distinct student geometry -> the presets that have it (each preset's conv stack at tiny width)."""
    tiny_width = dict(conv_channels=8, embed_dim=32, num_layers=1, num_heads=2, ffn_dim=32, pos_conv_kernel=8, pos_conv_groups=2)
    by_geometry: dict = {}
    for preset in PRESETS:
        geometry = mert_student(**student_args(preset, **tiny_width)).geometry
        by_geometry.setdefault(geometry, []).append(preset)
    return {"+".join(presets): geometry for geometry, presets in by_geometry.items()}


GEOMETRIES = _preset_geometries()


@pytest.fixture(scope="module")
def audio(tmp_path_factory) -> Path:
    return write_test_audio(tmp_path_factory.mktemp("conformance-audio"), seconds=(2.0, 2.5))


@pytest.fixture(scope="module")
def teacher_files(tmp_path_factory) -> dict[str, dict]:
    """Options naming files a teacher needs and no test can download: random EnCodec weights, a tiny student."""
    from mert_plugins.teachers.rvq_vae import CHECKPOINT_NAME, save_random_weights

    folder = tmp_path_factory.mktemp("conformance-files")
    torch.manual_seed(0)
    save_student(tiny(), folder / "student.safetensors")
    return {
        "rvq-vae": {"weights_path": str(save_random_weights(folder / CHECKPOINT_NAME, seed=0))},
        "kmeans-hidden": {"checkpoint": str(folder / "student.safetensors")},
    }


def test_every_preset_geometry_is_covered():
    assert sorted(p for ids in GEOMETRIES for p in ids.split("+")) == sorted(PRESETS)


@pytest.mark.parametrize("geometry_id", list(GEOMETRIES))
@pytest.mark.parametrize("name", REGISTRY.names("teacher"))
def test_every_teacher_honours_the_contract(name, geometry_id, audio, teacher_files):
    options = {**SMALL_TEACHER_OPTIONS.get(name, {}), **teacher_files.get(name, {})}
    check_teacher(lambda g: REGISTRY.build("teacher", name, options, geometry=g), audio=[audio], geometry=GEOMETRIES[geometry_id])


@pytest.mark.parametrize("name", REGISTRY.names("augment"))
def test_every_augmentation_honours_the_contract(name):
    check_augment(lambda sample_rate: REGISTRY.build("augment", name, {"prob": 1.0}, sample_rate=sample_rate))


@pytest.fixture(scope="module")
def task_data(tmp_path_factory) -> dict[str, dict]:
    """Options pointing tasks at data this test writes: a tiny demo set, a tiny GTZAN tree."""
    from mert_core.demo import DemoSize, ensure_demo_data
    from test_eval_tasks import _gtzan

    root = tmp_path_factory.mktemp("conformance-tasks")
    demo = ensure_demo_data(root / "demo", size=DemoSize(pieces_per_key=3, piece_seconds=2.0, keys=("C major", "A minor", "F# major"),
                                                         note_pitches=(60, 64), timbres=("flute", "bell", "organ"), note_seconds=0.3), progress=False)
    gtzan = _gtzan(root / "GTZAN")
    options = {name: {"data_dir": demo} for name in REGISTRY.names("task") if name.startswith("demo-")}
    options["gtzan-genre"] = {"data_dir": gtzan, "split_dir": gtzan / "splits"}
    options["mtt-tagging"] = {"data_dir": _mtt(root / "MTT"), "num_tags": 3}
    mtg = root / "mtg-jamendo-dataset"
    for name, prefix in (("mtg-top50", "top50tags"), ("mtg-genre", "genre"), ("mtg-instrument", "instrument"), ("mtg-moodtheme", "moodtheme")):
        _mtg_split(mtg, prefix)
        options[name] = {"data_dir": mtg, "audio_dir": root / "mtg-audio"}
    return options


def _mtt(root: Path) -> Path:
    """MagnaTagATune's annotations_final.csv: folders 0-b train, c valid, d-f test (the audio is never read here)."""
    tags = ["guitar", "piano", "rock"]
    rows = [("0/a.mp3", [1, 0, 1]), ("b/b.mp3", [1, 1, 0]), ("c/c.mp3", [1, 0, 1]), ("c/g.mp3", [0, 1, 0]),
            ("d/d.mp3", [0, 1, 1]), ("f/e.mp3", [1, 0, 0])]
    root.mkdir(parents=True)
    lines = ["\t".join(f'"{h}"' for h in ["clip_id", *tags, "mp3_path"])]
    lines += ["\t".join(f'"{v}"' for v in [i, *t, p]) for i, (p, t) in enumerate(rows)]
    (root / "annotations_final.csv").write_text("\n".join(lines) + "\n")
    return root


def _mtg_split(root: Path, prefix: str) -> None:
    """One MTG-Jamendo split-0 file set for the ``autotagging_<prefix>`` task."""
    split_dir = root / "data" / "splits" / "split-0"
    split_dir.mkdir(parents=True, exist_ok=True)
    header = "TRACK_ID\tARTIST_ID\tALBUM_ID\tPATH\tDURATION\tTAGS\n"
    tags = [f"{prefix}---a", f"{prefix}---b"]
    for split, rows in {"train": [("14/14.mp3", tags), ("15/15.mp3", tags[:1])], "validation": [("16/16.mp3", tags), ("18/18.mp3", tags[1:])],
                        "test": [("17/17.mp3", tags[1:]), ("19/19.mp3", tags[:1])]}.items():
        (split_dir / f"autotagging_{prefix}-{split}.tsv").write_text(
            header + "".join(f"track_{i}\tartist_1\talbum_1\t{p}\t200.0\t" + "\t".join(t) + "\n" for i, (p, t) in enumerate(rows)))


@pytest.mark.parametrize("name", REGISTRY.names("task"))
def test_every_task_honours_the_contract(name, task_data):
    """Tasks with data here read every split; the others (datasets in their official layouts that
    tests/test_eval_tasks.py builds one by one) have their declaration checked without reading data."""
    if name in task_data:
        check_task(REGISTRY.build("task", name, task_data[name]), splits=("train", "valid", "test"))
    else:
        check_task(REGISTRY.build("task", name), splits=())


FITTABLE = [name for name in REGISTRY.names("teacher") if REGISTRY.get("teacher", name).obj.fittable]


def test_fittable_is_declared_by_every_built_in_fitted_teacher():
    assert {"kmeans-mfcc", "kmeans-logmel-chroma", "kmeans-hidden", "best-rq", "mel-rvq", "cqt"} <= set(FITTABLE)
    assert not {"ema", "rvq-vae"} & set(FITTABLE)


@pytest.mark.parametrize("name", FITTABLE)
def test_every_fit_records_its_provenance_the_same_way(name, audio, teacher_files, tmp_path):
    """Each fitted file carries fit_provenance() (library versions, time) in its metadata, written by the core."""
    import json

    from safetensors import safe_open

    from mert_core.fitting import fit_provenance, fit_teacher

    options = {**SMALL_TEACHER_OPTIONS.get(name, {}), **teacher_files.get(name, {})}
    out = fit_teacher(name, [audio], tmp_path / "fitted.safetensors", options, registry=REGISTRY, device="cpu", progress=False)
    with safe_open(str(out), framework="pt") as f:
        (meta,) = [json.loads(v) for v in (f.metadata() or {}).values()]
    assert meta["versions"] == fit_provenance()["versions"] and meta["created"]


def test_the_core_imports_no_plugin():
    """Built-in plugins are plugins: mert_core never imports mert_plugins (a service several plugins
    need lives in the core; the core asks a plugin through the registry)."""
    import ast

    root = Path(__file__).resolve().parents[1] / "mert_core"
    offenders = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            offenders += [f"{path.relative_to(root.parent)}: {n}" for n in names if n.split(".")[0] == "mert_plugins"]
    assert not offenders, offenders

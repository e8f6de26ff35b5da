"""Built-in demo data: synthetic music with labels, made with numpy (no downloads).

Two kinds of clips, written as 24 kHz 16-bit WAV with a ``metadata.jsonl``:

* **pieces**: short tonal pieces in all 24 major/minor keys (melody, chords,
  bass, drums) at 70-160 BPM; labels key, tempo, beats and downbeats. The
  chord progressions (I-IV-V-I, i-iv-V-i with the harmonic-minor leading tone,
  ...) make the key unambiguous. They are also the demo *training* set.
* **notes**: single notes, MIDI 36-84, in six timbre families (flute, string,
  reed, pluck, bell, organ); labels pitch and timbre.

Everything is a pure function of the seed and the size parameters: the same
call writes the same bytes. Splits are fixed and stratified: every key has
pieces in train, valid and test (given >= 3 pieces per key); every pitch and
every timbre has notes in train.

The metadata schema (one JSON object per line) is documented in
``docs/data.md``; downstream demo tasks (key, pitch, timbre, beat) are built
from it, so it only changes with a new ``DEMO_VERSION``.
"""

from __future__ import annotations

import functools
import io
import json
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import scipy.signal
import soundfile as sf
from tqdm.auto import tqdm

from mert_core.errors import DataError
from mert_core.files import publish_folder

DEMO_VERSION = "demo-v1"
SAMPLE_RATE = 24000
TONIC_NAMES = ("C", "Db", "D", "Eb", "E", "F", "F#", "G", "Ab", "A", "Bb", "B")
MODES = ("major", "minor")
KEYS = tuple(f"{t} {m}" for m in MODES for t in TONIC_NAMES)
"""All 24 keys as mir_eval key strings: ``"C major"`` ... ``"B minor"``."""
TIMBRES = ("flute", "string", "reed", "pluck", "bell", "organ")

_SCALES = {"major": (0, 2, 4, 5, 7, 9, 11), "minor": (0, 2, 3, 5, 7, 8, 11)}  # minor: harmonic
# Progressions as scale degrees (0 = tonic). In harmonic minor, degree 4 is a
# major V with the leading tone, which together with iv pins the key down.
_PROGRESSIONS = ((0, 3, 4, 0), (0, 1, 4, 0), (0, 3, 0, 4), (0, 5, 3, 4, 0, 3, 4, 0), (0, 5, 1, 4, 0, 1, 4, 0))
_METADATA = "metadata.jsonl"
_STAMP = "VERSION"


@dataclass(frozen=True)
class DemoSize:
    """Size parameters of the demo set (the defaults make ~27 min of audio).

    Attributes:
        pieces_per_key: pieces per key (24 keys).
        piece_seconds: length of each piece.
        keys: which keys (mir_eval strings); empty = all 24.
        note_pitches: MIDI pitches of the single notes.
        timbres: timbre families of the single notes.
        note_seconds: length of each note file.
    """

    pieces_per_key: int = 4
    piece_seconds: float = 12.0
    keys: tuple[str, ...] = ()
    note_pitches: tuple[int, ...] = tuple(range(36, 85))
    timbres: tuple[str, ...] = TIMBRES
    note_seconds: float = 1.5

    def __post_init__(self):
        bad = [k for k in self.keys if k not in KEYS]
        if bad:
            raise ValueError(f"DemoSize.keys: unknown key(s) {bad}; expected strings like {KEYS[0]!r}, {KEYS[21]!r}")
        bad = [t for t in self.timbres if t not in TIMBRES]
        if bad:
            raise ValueError(f"DemoSize.timbres: unknown timbre(s) {bad}; expected some of {', '.join(TIMBRES)}")
        if self.piece_seconds < 1 or self.note_seconds < 0.2:
            raise ValueError(f"DemoSize: piece_seconds >= 1 and note_seconds >= 0.2 expected, got {self.piece_seconds}, {self.note_seconds}")


# ---------------------------------------------------------------------------
# Public entry points
# ---------------------------------------------------------------------------


def demo_root() -> Path:
    """The folder :func:`ensure_demo_data` uses by default, ``$MERT_CACHE/demo-v1``; it is not generated here."""
    from mert_core.paths import cache_root

    return (cache_root() / DEMO_VERSION).expanduser().absolute()


def ensure_demo_data(root: Path | None = None, seed: int = 0, size: DemoSize = DemoSize(), progress: bool = True) -> Path:
    """Generate the demo set once and return its folder; later calls reuse it.

    Args:
        root: target folder; default ``$MERT_CACHE/demo-v1`` (``~/.cache/mert/demo-v1``).
        seed: generator seed.
        size: size parameters (tests use small ones).
        progress: show a progress bar.

    The set is written to a temporary sibling folder and renamed into place,
    so an interrupted run or a concurrent one (e.g. several ranks) never leaves
    a half-written folder. A ``VERSION`` stamp records version, seed and size;
    a folder with a different stamp is regenerated.
    """
    root = demo_root() if root is None else Path(root).expanduser().absolute()
    stamp = _stamp(seed, size)
    if _read_stamp(root) == stamp:
        return root
    if root.exists() and any(root.iterdir()) and _read_stamp(root) is None:
        raise DataError(
            f"{root}: exists and is not a mert demo folder (no {_STAMP} file); "
            "pass another root or remove the folder"
        )
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    try:
        generate_demo_data(tmp, seed=seed, size=size, progress=progress)
        # an older version (or an empty folder) is replaced; if another process
        # renamed its copy in first, use it if it is complete
        if not publish_folder(tmp, root) and _read_stamp(root) != stamp:
            raise OSError(f"{root}: cannot put the demo data in place (another process is writing it?); run again")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def load_demo_metadata(root: Path, kind: str | None = None, split: str | None = None) -> list[dict[str, Any]]:
    """Read ``metadata.jsonl`` of a demo folder, optionally filtered.

    Args:
        root: the folder :func:`ensure_demo_data` returned.
        kind: ``"piece"`` or ``"note"``; None keeps both.
        split: ``"train"``, ``"valid"`` or ``"test"``; None keeps all.

    Returns:
        One dict per file (schema in ``docs/data.md``); ``path`` is relative to ``root``.
    """
    path = Path(root) / _METADATA
    if not path.exists():
        raise DataError(f"{path}: not found; expected a demo folder made by ensure_demo_data()")
    with open(path, encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.strip()]
    return [r for r in records if (kind is None or r["kind"] == kind) and (split is None or r["split"] == split)]


def synthetic_music(seconds: float, sample_rate: int = SAMPLE_RATE, seed: int = 0) -> np.ndarray:
    """Chords of harmonic tones with vibrato and decay, a bass line, percussive noise bursts:
    a test signal with the spectral shape of music, shared by the CQT teacher's tests
    and benchmark (``(seconds * sample_rate,)`` float32 in [-0.8, 0.8])."""
    rng = np.random.default_rng(seed)
    n = int(seconds * sample_rate)
    out = np.zeros(n)
    for start in np.arange(0, seconds, 0.5):
        seg = slice(int(start * sample_rate), min(n, int((start + 0.5) * sample_rate)))
        ts = np.arange(seg.stop - seg.start) / sample_rate
        env = np.exp(-2.5 * ts)
        root = 110 * 2 ** (rng.integers(0, 12) / 12)
        for interval in (0, 4, 7) if rng.random() < 0.5 else (0, 3, 7, 10):
            f0 = root * 2 ** (interval / 12) * 2 ** rng.integers(0, 3)
            phase = 2 * np.pi * f0 * np.cumsum(1 + 0.006 * np.sin(2 * np.pi * rng.uniform(4, 7) * ts)) / sample_rate
            for h in range(1, 7):
                out[seg] += 0.05 / h * env * np.sin(h * phase + rng.uniform(0, 2 * np.pi))
        out[seg] += 0.15 * env * np.sin(2 * np.pi * root / 2 * ts)
        out[seg] += 0.2 * rng.standard_normal(len(ts)) * np.exp(-40 * ts) * (rng.random() < 0.7)
    out += 0.003 * rng.standard_normal(n)
    return (0.8 * out / np.abs(out).max()).astype(np.float32)


def generate_demo_data(out_dir: Path, seed: int = 0, size: DemoSize = DemoSize(), progress: bool = True) -> list[dict[str, Any]]:
    """Write the demo set into ``out_dir`` (created if needed) and return its metadata."""
    out_dir = Path(out_dir)
    (out_dir / "pieces").mkdir(parents=True, exist_ok=True)
    (out_dir / "notes").mkdir(parents=True, exist_ok=True)
    keys = size.keys or KEYS
    jobs: list[tuple[str, Any]] = []
    for key in keys:
        for p, split in enumerate(_piece_splits(size.pieces_per_key)):
            jobs.append(("piece", (key, p, split)))
    for pi, midi in enumerate(size.note_pitches):
        for ti, timbre in enumerate(size.timbres):
            jobs.append(("note", (midi, timbre, _note_split(pi, ti, len(size.timbres)))))

    records = []
    for kind, args in tqdm(jobs, desc="generating demo data", unit="file", disable=not progress):
        if kind == "piece":
            key, p, split = args
            rng = np.random.default_rng([seed, 0, KEYS.index(key), p])
            audio, labels = _render_piece(key, size.piece_seconds, rng)
            tonic, mode = key.split()
            rel = f"pieces/piece-{tonic.replace('#', 's')}-{mode}-{p}.wav"
            rec = {"path": rel, "kind": "piece", "split": split, "duration_seconds": size.piece_seconds, **labels}
        else:
            midi, timbre, split = args
            rng = np.random.default_rng([seed, 1, midi, TIMBRES.index(timbre)])
            audio = _render_note(timbre, midi, size.note_seconds, rng)
            rel = f"notes/note-{midi:03d}-{timbre}.wav"
            rec = {"path": rel, "kind": "note", "split": split, "duration_seconds": size.note_seconds, "pitch": midi, "timbre": timbre}
        # Encode in memory: soundfile's file writer fsyncs each file, which is
        # most of the run time on a busy disk.
        buf = io.BytesIO()
        sf.write(buf, np.clip(audio, -1.0, 1.0), SAMPLE_RATE, subtype="PCM_16", format="WAV")
        (out_dir / rel).write_bytes(buf.getvalue())
        records.append(rec)

    with open(out_dir / _METADATA, "w", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec) + "\n")
    (out_dir / "README.txt").write_text(_readme(seed, size, records), encoding="utf-8")
    (out_dir / _STAMP).write_text(_stamp(seed, size) + "\n", encoding="utf-8")
    return records


# ---------------------------------------------------------------------------
# Splits and stamps
# ---------------------------------------------------------------------------


def _piece_splits(n: int) -> list[str]:
    """Splits of a key's ``n`` pieces: every split gets one when ``n >= 3``, train the rest."""
    if n <= 2:
        return ["train", "test"][:n]
    return ["train"] * (n - 2) + ["valid", "test"]


def _note_split(pitch_index: int, timbre_index: int, n_timbres: int) -> str:
    """Rotate valid/test over timbres from pitch to pitch, so every pitch has
    ``n_timbres - 2`` training notes and every timbre appears in every split."""
    if n_timbres < 3:
        return "train"
    r = (pitch_index + timbre_index) % n_timbres
    return "valid" if r == n_timbres - 2 else "test" if r == n_timbres - 1 else "train"


def _stamp(seed: int, size: DemoSize) -> str:
    return json.dumps({"version": DEMO_VERSION, "seed": seed, "size": asdict(size)}, sort_keys=True)


def _read_stamp(root: Path) -> str | None:
    try:
        return (root / _STAMP).read_text(encoding="utf-8").strip()
    except OSError:
        return None


def _readme(seed: int, size: DemoSize, records: list[dict]) -> str:
    n_pieces = sum(r["kind"] == "piece" for r in records)
    n_notes = len(records) - n_pieces
    minutes = sum(r["duration_seconds"] for r in records) / 60
    return f"""mert demo data ({DEMO_VERSION}, seed {seed})
=====================================

Synthetic music generated by mert_core.demo (numpy only; no recordings, free to use).
{n_pieces} pieces + {n_notes} single notes, {minutes:.1f} minutes, 24 kHz mono 16-bit WAV.

pieces/  tonal pieces ({size.piece_seconds:g} s) in major/minor keys: melody, chords, bass, drums,
         70-160 BPM, 4/4. Labels: key ("C major", "A minor"; mir_eval strings), tonic, mode,
         tempo_bpm, beats and downbeats (seconds).
notes/   single notes ({size.note_seconds:g} s), MIDI {min(size.note_pitches)}-{max(size.note_pitches)}, timbres
         {', '.join(size.timbres)}. Labels: pitch (MIDI), timbre.

metadata.jsonl: one JSON object per file: path (relative to this folder), kind ("piece" or
"note"), split ("train", "valid", "test"), duration_seconds, and the labels above.
Regenerate with: python -c "from mert_core.demo import ensure_demo_data; ensure_demo_data()"
"""


# ---------------------------------------------------------------------------
# Synthesis: notes
# ---------------------------------------------------------------------------


def _midi_hz(midi: float) -> float:
    return 440.0 * 2.0 ** ((midi - 69) / 12)


# Harmonic amplitudes (harmonic number k starting at 1) of the wavetable timbres.
def _harmonics(timbre: str, f0: float) -> np.ndarray:
    k_max = max(1, int(0.45 * SAMPLE_RATE / f0))  # band-limit: no aliasing
    k = np.arange(1, min(k_max, 40) + 1)
    if timbre == "flute":
        amps = np.array([1.0, 0.25, 0.1, 0.05])
    elif timbre == "string":  # sawtooth-ish
        amps = 1.0 / k
    elif timbre == "reed":  # square-ish: odd harmonics, weak even ones
        amps = np.where(k % 2 == 1, 1.0 / k, 0.04 / k)
    elif timbre == "organ":  # drawbars 8', 4', 2 2/3', 2', 1 3/5'-ish, 1'
        amps = np.zeros(8)
        amps[[0, 1, 2, 3, 5, 7]] = [1.0, 0.6, 0.45, 0.3, 0.2, 0.15]
    else:
        raise ValueError(f"no wavetable for timbre {timbre!r}")
    return amps[: len(k)]


_TABLE_SIZE = 2048
_ENVELOPES = {  # attack s, release s, vibrato depth (fraction of f0), vibrato rate Hz
    "flute": (0.06, 0.08, 0.002, 5.0),
    "string": (0.08, 0.15, 0.003, 5.5),
    "reed": (0.02, 0.05, 0.0, 0.0),
    "organ": (0.01, 0.03, 0.0, 0.0),
    "pluck": (0.002, 0.05, 0.0, 0.0),
    "bell": (0.002, 0.1, 0.0, 0.0),
}


@functools.lru_cache(maxsize=512)
def _wavetable(timbre: str, midi: float) -> np.ndarray:
    """One period of a band-limited wavetable timbre, ``(_TABLE_SIZE + 1,)`` (wrapped)."""
    amps = _harmonics(timbre, _midi_hz(midi))
    grid = np.arange(_TABLE_SIZE) / _TABLE_SIZE
    k = np.arange(1, len(amps) + 1)[:, None]
    table = (amps[:, None] * np.sin(2 * np.pi * k * grid)).sum(axis=0)
    table /= np.abs(table).max()
    return np.append(table, table[0])


def _synth(timbre: str, midi: float, n: int, rng: np.random.Generator) -> np.ndarray:
    """``(n,)`` float array: one note of ``timbre`` lasting ``n`` samples (envelope included)."""
    f0 = _midi_hz(midi)
    attack, release, vib_depth, vib_rate = _ENVELOPES[timbre]
    t = np.arange(n) / SAMPLE_RATE
    if timbre == "pluck":
        y = _karplus_strong(f0, n, rng)
    elif timbre == "bell":
        # FM, carrier:modulator 1:1 (harmonic), decaying index, plus a faint
        # inharmonic partial for the metallic colour.
        index = 0.3 + 2.2 * np.exp(-t / 0.25)
        phase = 2 * np.pi * f0 * t + rng.uniform(0, 2 * np.pi)
        y = np.sin(phase + index * np.sin(phase)) * np.exp(-t / 0.9)
        if 2.76 * f0 < 0.45 * SAMPLE_RATE:
            y += 0.12 * np.sin(2 * np.pi * 2.76 * f0 * t) * np.exp(-t / 0.15)
    else:
        table = _wavetable(timbre, float(midi))
        inst_f = f0 * (1 + vib_depth * np.sin(2 * np.pi * vib_rate * t)) if vib_depth else np.full(n, f0)
        phase = (np.cumsum(inst_f) / SAMPLE_RATE + rng.uniform()) % 1.0
        y = np.interp(phase * _TABLE_SIZE, np.arange(_TABLE_SIZE + 1), table)
        if timbre == "flute":  # a little breath noise
            y += 0.03 * np.convolve(rng.standard_normal(n), np.ones(8) / 8, mode="same")
    env = np.ones(n)
    a = min(n, max(1, int(attack * SAMPLE_RATE)))
    env[:a] = np.linspace(0, 1, a, endpoint=False)
    r = min(n - a, max(1, int(release * SAMPLE_RATE)))
    if r > 0:
        env[n - r :] *= np.linspace(1, 0, r)
    return y * env


def _karplus_strong(f0: float, n: int, rng: np.random.Generator, decay_seconds: float = 1.5) -> np.ndarray:
    """Plucked string: a burst circulating in a damped delay line (Karplus-Strong).

    The loop filter ``(1 - s) + s z^-1`` damps high harmonics; ``s`` shrinks
    for high notes (Jaffe-Smith) so that they ring about as long as low ones.
    Loop delay ``N + s + d`` = ``SAMPLE_RATE / f0`` samples (``d`` by linear
    interpolation), so the pitch is exact.
    """
    period = SAMPLE_RATE / f0
    w0 = 2 * np.pi / period
    s = min(0.5, 4.0 / (f0 * w0**2))  # fundamental loses ~e^-2 per second to the filter
    N = int(np.floor(period - s))
    d = period - s - N
    gain = np.exp(-1.0 / (decay_seconds * f0))
    w = gain * np.convolve([1 - s, s], [1 - d, d])  # taps at delays N, N+1, N+2
    # The "pluck": one period of a random-phase harmonic wave rather than white
    # noise, so the attack carries no energy between the harmonics (which would
    # smear the pitch-class content of short notes).
    k = np.arange(1, max(1, int(0.45 * SAMPLE_RATE / f0)) + 1)[:, None]
    t = np.arange(N) / SAMPLE_RATE
    burst = (np.sin(2 * np.pi * k * f0 * t + rng.uniform(0, 2 * np.pi, (len(k), 1))) / k).sum(axis=0)
    burst /= np.abs(burst).max()
    x = np.zeros(n)
    x[: min(N, n)] = burst[: min(N, n)]
    if N < 128:
        # Short loops (high notes): as an IIR filter in C; its cost grows with N.
        a = np.zeros(N + 3)
        a[0], a[N:] = 1.0, -w
        y = scipy.signal.lfilter([1.0], a, x)
    else:
        # Long loops: N samples at a time, the feedback only looks >= N back.
        pad = N + 2
        y = np.zeros(pad + n)
        y[pad:] = x
        for start in range(pad + N, pad + n, N):
            stop = min(start + N, pad + n)
            y[start:stop] += w[0] * y[start - N : stop - N] + w[1] * y[start - N - 1 : stop - N - 1] + w[2] * y[start - N - 2 : stop - N - 2]
        y = y[pad:]
    return y - y.mean()


def _render_note(timbre: str, midi: int, seconds: float, rng: np.random.Generator) -> np.ndarray:
    n = int(round(seconds * SAMPLE_RATE))
    y = _synth(timbre, midi, n, rng)
    return y / np.abs(y).max() * rng.uniform(0.5, 0.9)


# ---------------------------------------------------------------------------
# Synthesis: pieces
# ---------------------------------------------------------------------------


def _kick(rng: np.random.Generator) -> np.ndarray:
    t = np.arange(int(0.3 * SAMPLE_RATE)) / SAMPLE_RATE
    f = 45 + 75 * np.exp(-t / 0.03)
    return _fade_out(np.sin(2 * np.pi * np.cumsum(f) / SAMPLE_RATE) * np.exp(-t / 0.12))


def _snare(rng: np.random.Generator) -> np.ndarray:
    t = np.arange(int(0.2 * SAMPLE_RATE)) / SAMPLE_RATE
    noise = np.diff(rng.standard_normal(len(t) + 1)) * 0.5
    return _fade_out(noise * np.exp(-t / 0.06) + 0.5 * np.sin(2 * np.pi * 185 * t) * np.exp(-t / 0.04))


def _hat(rng: np.random.Generator) -> np.ndarray:
    t = np.arange(int(0.06 * SAMPLE_RATE)) / SAMPLE_RATE
    noise = np.diff(rng.standard_normal(len(t) + 2), n=2) * 0.25
    return _fade_out(noise * np.exp(-t / 0.015))


def _fade_out(sound: np.ndarray, seconds: float = 0.01) -> np.ndarray:
    """Ramp the last ``seconds`` to zero: a sound cut off mid-decay is a click (a false onset)."""
    n = min(len(sound), int(seconds * SAMPLE_RATE))
    sound[len(sound) - n :] *= np.linspace(1, 0, n)
    return sound


def _add(track: np.ndarray, sound: np.ndarray, start_s: float, gain: float) -> None:
    i = int(round(start_s * SAMPLE_RATE))
    if i >= len(track):
        return
    m = min(len(sound), len(track) - i)
    track[i : i + m] += gain * sound[:m]


def _render_piece(key: str, seconds: float, rng: np.random.Generator) -> tuple[np.ndarray, dict[str, Any]]:
    """One piece in ``key``: ``(samples,)`` audio and its labels."""
    tonic_name, mode = key.split()
    tonic = TONIC_NAMES.index(tonic_name)
    scale = _SCALES[mode]
    bpm = float(rng.integers(70, 161))
    beat_s = 60.0 / bpm
    lead_in = float(rng.uniform(0.0, 0.5))
    progression = _PROGRESSIONS[rng.integers(len(_PROGRESSIONS))]
    melody_timbre = TIMBRES[rng.integers(len(TIMBRES))]
    chord_timbre = ("organ", "string", "reed", "pluck")[rng.integers(4)]
    bass_timbre = ("pluck", "string")[rng.integers(2)]
    n = int(round(seconds * SAMPLE_RATE))
    mix = np.zeros(n)

    beats = [lead_in + k * beat_s for k in range(int((seconds - lead_in) / beat_s) + 1) if lead_in + k * beat_s < seconds]
    n_bars = (len(beats) + 3) // 4
    chords = [progression[b % len(progression)] for b in range(n_bars)]
    if n_bars > 1:
        chords[-1] = 0  # end on the tonic

    def degree_midi(degree: int, base: int) -> int:
        """MIDI note of scale degree ``degree`` (any integer) above ``base`` + tonic."""
        octave, step = divmod(degree, 7)
        return base + tonic + 12 * octave + scale[step]

    # Chords: a triad per bar, around middle C, held for the bar.
    for bar, degree in enumerate(chords):
        start = beats[4 * bar]
        length = 4 * beat_s if chord_timbre != "pluck" else beat_s
        repeats = 1 if chord_timbre != "pluck" else 4
        for r in range(repeats):
            for third in (0, 2, 4):
                midi = degree_midi(degree + third, 48)
                midi += 12 if midi < 52 else 0
                note = _synth(chord_timbre, midi, int(length * 1.05 * SAMPLE_RATE), rng)
                _add(mix, note, start + r * beat_s, 0.12)

    # Bass: chord root on beats 1 and 3.
    for bar, degree in enumerate(chords):
        root = degree_midi(degree, 36)
        root -= 12 if root > 47 else 0
        for half in (0, 2):
            if 4 * bar + half < len(beats):
                note = _synth(bass_timbre, root, int(2 * beat_s * SAMPLE_RATE), rng)
                _add(mix, note, beats[4 * bar + half], 0.3)

    # Melody: a walk on the scale; chord tones on downbeats.
    degree = 7 + int(rng.integers(0, 5))  # degrees above MIDI 60 + tonic offset - 12
    for b, t in enumerate(beats):
        bar, beat_in_bar = divmod(b, 4)
        chord = chords[bar]
        pattern = rng.choice(3, p=[0.5, 0.35, 0.15]) if beat_in_bar else 0
        if pattern == 2:
            continue  # a rest
        for sub in range(1 if pattern == 0 else 2):
            tones = [chord + third + 7 * o for o in range(0, 3) for third in (0, 2, 4)]
            if bar == len(chords) - 1 and beat_in_bar == 0 and sub == 0:
                degree = min((7, 14), key=lambda x: abs(x - degree))  # the last bar: tonic
            elif (beat_in_bar == 0 and sub == 0) or rng.uniform() < 0.5:
                # Chord tones on downbeats and on half the other notes: the
                # melody outlines the harmony, which outlines the key.
                degree = min((x for x in tones if x != degree or beat_in_bar == 0), key=lambda x: (abs(x - degree), x))
            else:
                degree += int(rng.choice([-2, -1, -1, 1, 1, 2]))
            degree = int(np.clip(degree, 5, 16))
            dur = beat_s / (1 if pattern == 0 else 2)
            note = _synth(melody_timbre, degree_midi(degree, 48), int(dur * 1.1 * SAMPLE_RATE), rng)
            _add(mix, note, t + sub * dur, 0.25)

    # Drums: kick on 1 and 3, snare on 2 and 4, hi-hat on eighths.
    for b, t in enumerate(beats):
        _add(mix, _kick(rng) if b % 2 == 0 else _snare(rng), t, 0.4 if b % 2 == 0 else 0.3)
        _add(mix, _hat(rng), t, 0.05)
        _add(mix, _hat(rng), t + beat_s / 2, 0.035)

    fade = int(0.05 * SAMPLE_RATE)
    mix[-fade:] *= np.linspace(1, 0, fade)
    mix *= 0.9 / max(np.abs(mix).max(), 1e-9)
    labels = {
        "key": key,
        "tonic": tonic_name,
        "mode": mode,
        "tempo_bpm": bpm,
        "beats": [round(t, 4) for t in beats],
        "downbeats": [round(t, 4) for t in beats[::4]],
    }
    return mix, labels

"""The teacher signal cache (``teacher_cache.k``): the teacher's top-k at every labelled position, computed once.

A sweep over off-policy objectives (fkl, rkl, jsd, tvd, skl, rlkd …) runs the same frozen
teacher on the same training records once per job and step. With ``teacher_cache.k`` set, one
pass over the training split before fit stores, per labelled position, what the objectives need
of the teacher (kdlab/losses/sparse.py): its k largest logits and their ids, the log-normaliser
and the log of the probability left outside the top-k, at the objective's temperature. The
arrays are memory-mapped from ``<paths.cache_dir>/teacher_signals/<key>/``, every job of the
sweep (and every later run) with the same key reuses them, and training steps run no teacher
forward: the module is given the entry (:class:`TeacherSignals`), and its cached-teacher step
(kdlab/steps.py) reads each batch's rows by the records' indices and hands the objective a
sparse view instead of dense teacher logits. Validation and test
still run the teacher (its reference metrics). The objectives then see the teacher on k + 1
outcomes — an approximation, said in a warning (the tail treatment: kdlab/losses/sparse.py).

The key hashes everything that changes the stored values: the teacher (a strided sample of every
weight tensor, and its config node), the tokenizer, the tokenised training split
(:func:`kdlab.cache.data_fingerprint`), k, the distillation vocabulary (its truncation), the
temperature (the tail mass at one τ cannot be derived from another's, so each τ is its own
entry, exact), the trainer's precision and a format version. An entry is written the way
kdlab/warm_start.py writes a model: into a temporary folder renamed when complete, with a manifest
of checksums written last and verified on load, so a corrupted or half-written entry is rebuilt,
never read.

Layout of an entry (N labelled positions over R training records, record i's positions are rows
``offsets[i]:offsets[i+1]`` in order of position):

    values.npy   (N, k) float16  the teacher's top-k logits z minus the largest, z − z_1 (so ≤ 0), largest first
    indices.npy  (N, k) uint16   their token ids (int32 when the vocabulary exceeds 65,536)
    log_norm.npy (N,)   float32  log Σ_v exp((z_v − z_1)/τ) over the distillation vocabulary
    log_tail.npy (N,)   float32  log(1 − Σ_top-k p_τ)
    labels.npy   (N,)   int32    the target token of each position (checked against every batch)
    offsets.npy  (R+1,) int64
    kdlab-cache.json             format version, settings, shapes, checksums (written last)

Storage is 4k + 12 bytes per labelled position with V ≤ 65,536 (140 at k = 32), 6k + 12 above.
A softmax is unchanged by a shift of its logits, so each row is stored shifted by its largest
logit, with log_norm shifted alike: the stored values then lie in [−range, 0], where float16's
spacing is at most 2⁻¹¹ of the magnitude (≤ 0.002 for the tokens within 2 nats of the top, whose
probabilities dominate every objective). RLKD's logit ranking is shift-invariant too.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from kdlab import cache
from kdlab.cache import MANIFEST, cache_key, data_fingerprint
from kdlab.losses.base import IGNORE_INDEX, needs_of
from kdlab.losses.sparse import SparseTeacher, sparse_teacher

log = logging.getLogger(__name__)

FORMAT_VERSION = 2  # bump when what is stored, or how it is computed, changes: every entry is then rebuilt
ARRAYS = ("values", "indices", "log_norm", "log_tail", "labels", "offsets")
# rows of (rows, V) teacher logits turned into top-k at once while building: 2^23 logits, as loss.chunk_size: auto
BUILD_CHUNK_ELEMENTS = 2**23
# entries per weight tensor hashed into the teacher's fingerprint (module docstring)
FINGERPRINT_SAMPLES = 4096


def approximation_note(k: int) -> str:
    return (
        f"teacher_cache.k={k}: the objective sees an approximation of the teacher: its top-{k} tokens at each "
        "position plus one tail outcome holding the rest of its probability, m = 1 - sum of the top-k p. The "
        f"student's distribution is coarsened to the same {k}+1 outcomes, so each divergence is exact on that "
        "partition and at most the full one (data-processing inequality); RLKD's ranking gives a token outside "
        "the cached top-k the probability m/(V-k). Set teacher_cache.k=null for the exact dense teacher."
    )


# -- settings, checked before any model is built ----------------------------------------------------
def check_request(settings, loss, tokenizer_size: int) -> int | None:
    """``teacher_cache.k`` for this run, or None when the cache is off or has nothing to do.

    Raises, naming the cause and the fix, for a k that is not a positive integer or covers the
    whole vocabulary, and for losses the cache cannot serve: rollout losses (their teacher scores
    the student's own samples, never the training records), ``loss.fused_head`` (which computes the
    teacher from its hidden states), and losses that read dense teacher logits.
    """
    k = settings.get("k") if settings else None
    if k is None:
        return None
    name = type(loss).__name__
    needs = needs_of(loss)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"teacher_cache.k={k!r} must be an integer >= 1 (the teacher's top-k ids cached per position) or null (off)")
    if not needs.teacher:
        log.info("teacher_cache.k=%d has nothing to cache: %s uses no teacher", k, name)
        return None
    if needs.rollouts is not None:
        raise ValueError(
            f"teacher_cache.k={k} caches the teacher on the training records, but {name} trains on the student's own "
            "samples (rollouts), which the teacher must score as they are drawn: set teacher_cache.k=null for "
            "rollout losses (minillm, onpolicy)"
        )
    if needs.fused_head:
        raise ValueError(
            f"teacher_cache.k={k} and loss.fused_head=true both replace the teacher's logits (the cache by its stored "
            "top-k, the fused head by its hidden states): set one of teacher_cache.k=null or loss.fused_head=false"
        )
    if not needs.sparse_teacher:
        raise ValueError(
            f"teacher_cache.k={k}: {name} reads the teacher's dense logits and does not take the cache's top-k view "
            "(kdlab.losses.sparse); set teacher_cache.k=null, or make the loss accept KDBatch.teacher_sparse "
            "(Needs(sparse_teacher=True))"
        )
    cached_temperature(loss, k)
    needed = needs.ranked_top_k  # RLKD ranks the teacher's top-loss.k ids
    if needed is not None and needed > k:
        raise ValueError(f"loss.k={needed}: RLKD ranks the teacher's top-{needed} ids, and teacher_cache.k={k} caches {k}; set teacher_cache.k >= {needed}")
    check_vocabulary(k, tokenizer_size, "the tokenizer's whole")
    return k


def cached_temperature(loss, k: int) -> float:
    """The τ at which ``loss`` needs the cached teacher's normaliser and tail (``Needs.teacher_temperature``)."""
    temperature = needs_of(loss).teacher_temperature
    if temperature is None:
        raise ValueError(
            f"teacher_cache.k={k}: {type(loss).__name__} reads the teacher at two temperatures (loss=rlkd ranks its "
            "probabilities at temperature 1, and its base is at another); one cached teacher holds the tail mass at "
            "one temperature: set teacher_cache.k=null or give the base temperature 1"
        )
    return float(temperature)


def check_vocabulary(k: int, vocab: int, what: str = "the whole distillation") -> None:
    if k >= vocab:
        raise ValueError(
            f"teacher_cache.k={k} covers {what} vocabulary ({vocab} tokens): the cache would store the dense "
            f"teacher, only permuted. Set teacher_cache.k=null to use the dense teacher (exact), or a k below {vocab}"
        )


# -- the key --------------------------------------------------------------------------------------
def teacher_fingerprint(model, samples: int = FINGERPRINT_SAMPLES) -> str:
    """A hash of the teacher's weights: each tensor's name, shape, dtype and a strided sample of up to
    ``samples`` entries. Any training or fine-tuning moves (practically) every entry, so it changes
    the hash, at a cost independent of the model's size; hashing a 7B model whole would take
    longer than many cache builds. A hand-edit of a few single weights could go unseen (delete the entry)."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        flat = tensor.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // samples)][:samples]
        sample = sample.to("cpu", torch.float64 if sample.is_floating_point() else torch.int64)
        digest.update(json.dumps([name, list(tensor.shape), str(tensor.dtype)]).encode())
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()[:16]


def signal_key(teacher, tokenizer, datamodule, k: int, vocab_size: int, temperature: float, precision, teacher_config=None) -> str:
    from kdlab.data.files import tokenizer_fingerprint  # the tokenised-file cache's own fingerprint

    return cache_key(
        "teacher-signals",
        FORMAT_VERSION,
        teacher_fingerprint(teacher),
        teacher_config,
        tokenizer_fingerprint(tokenizer),
        data_fingerprint(datamodule),
        k,
        vocab_size,
        float(temperature),
        str(precision),
    )


# -- the stored arrays ------------------------------------------------------------------------------
class InMemorySignals:
    """One batch's teacher view held in memory, served like a cache entry (``module.training_step``
    outside a run: benchmarks and tests that compute the view themselves)."""

    def __init__(self, view: SparseTeacher):
        self._view = view

    def view(self, index: Tensor, labels: Tensor) -> SparseTeacher:
        return self._view


class TeacherSignals:
    """A cache entry, memory-mapped read-only; :meth:`view` gives a training batch's rows.

    Pickled by its path (a process that unpickles it reopens the memory maps instead of copying the arrays).
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        manifest = json.loads((self.path / MANIFEST).read_text())
        self.k, self.temperature, self.vocab_size = manifest["k"], manifest["temperature"], manifest["vocab_size"]
        self.arrays = {name: np.load(self.path / f"{name}.npy", mmap_mode="r") for name in ARRAYS}
        self.offsets = np.asarray(self.arrays["offsets"])

    def __getstate__(self) -> dict:
        return {"path": self.path}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path"])

    @property
    def num_records(self) -> int:
        return len(self.offsets) - 1

    def rows(self, records: list[int]) -> np.ndarray:
        """The cache rows of ``records``' labelled positions, record after record."""
        return np.concatenate([np.arange(self.offsets[i], self.offsets[i + 1]) for i in records])

    def view(self, index: Tensor, labels: Tensor) -> SparseTeacher:
        """The teacher's rows for a training batch of records ``index`` (B,), laid out like ``labels``
        (B, T) and on their device: a :class:`SparseTeacher`.

        Checks that each record has as many labelled positions as cached and the same target
        tokens, so a cache that does not belong to these records stops the run instead of training
        on another record's teacher.
        """
        records = index.tolist()
        mask = labels != IGNORE_INDEX
        if records and (min(records) < 0 or max(records) >= self.num_records):
            raise RuntimeError(f"the teacher cache at {self.path} holds {self.num_records} records; the batch asks for record {max(records)}")
        counts = mask.sum(-1).tolist()
        rows = self.rows(records) if records else np.zeros(0, dtype=np.int64)
        cached_labels = torch.from_numpy(self.arrays["labels"][rows].astype(np.int64))
        expected = [int(self.offsets[i + 1] - self.offsets[i]) for i in records]
        if counts != expected or not torch.equal(cached_labels, labels[mask].cpu()):
            bad = next((i for i, (a, b) in enumerate(zip(counts, expected)) if a != b), None)
            detail = f"record {records[bad]} has {counts[bad]} labelled positions, the cache {expected[bad]}" if bad is not None else "other target tokens"
            raise RuntimeError(
                f"the teacher cache at {self.path} does not belong to these training records ({detail}): its key missed "
                "a change of the data. Delete that folder (it is rebuilt on the next run)"
            )
        b, t = labels.shape

        def laid_out(name: str, dtype: torch.dtype) -> Tensor:
            flat = torch.from_numpy(np.ascontiguousarray(self.arrays[name][rows])).to(dtype)
            out = torch.zeros((b, t, *flat.shape[1:]), dtype=dtype)
            out[mask.cpu()] = flat
            return out.to(labels.device)

        return SparseTeacher(
            laid_out("values", torch.float32),
            laid_out("indices", torch.long),
            laid_out("log_norm", torch.float32),
            laid_out("log_tail", torch.float32),
            float(self.temperature),
        )


PAYLOAD = tuple(f"{name}.npy" for name in ARRAYS)


def load(path: Path, expected: dict) -> TeacherSignals | None:
    """The entry at ``path``, or None (with a warning saying why, and the entry removed) if it is
    incomplete, from another format version or settings, or its arrays do not match their checksums."""
    if cache.load(path, {"format_version": FORMAT_VERSION, **expected}, PAYLOAD, "teacher signals") is None:
        return None
    return TeacherSignals(path)


def build(
    path: Path,
    teacher,
    datamodule,
    k: int,
    vocab_size: int,
    temperature: float,
    batch_size: int,
    device="cpu",
    forward_context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> None:
    """One teacher pass over the training records, written to ``path`` (atomically: module docstring).

    Records are batched by length (less padding) in the DataModule's own layout (right-padded,
    labels aligned with the logits), so each cached row is the row a training batch has;
    ``forward_context`` is the trainer's precision context (e.g. bf16 autocast), as in training.
    """
    records = datamodule.records["train"]
    offsets = np.zeros(len(records) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([datamodule.teacher_positions(r) for r in records])
    total = int(offsets[-1])
    if total == 0:
        raise ValueError("teacher_cache.k: the training split has no labelled position; there is nothing to cache")
    settings = {"format_version": FORMAT_VERSION, **_settings(k, vocab_size, temperature, len(records), total)}
    cache.write(path, lambda tmp: _fill(tmp, teacher, datamodule, records, offsets, k, vocab_size, temperature,
                                        batch_size, device, forward_context), settings, PAYLOAD)


def _fill(tmp: Path, teacher, datamodule, records, offsets, k, vocab_size, temperature, batch_size, device, forward_context) -> None:
    total = int(offsets[-1])
    shapes = {"values": ((total, k), np.float16), "indices": ((total, k), index_dtype(vocab_size)), "log_norm": ((total,), np.float32),
              "log_tail": ((total,), np.float32), "labels": ((total,), np.int32), "offsets": ((len(offsets),), np.int64)}
    out = {name: np.lib.format.open_memmap(tmp / f"{name}.npy", mode="w+", dtype=dtype, shape=shape) for name, (shape, dtype) in shapes.items()}
    out["offsets"][:] = offsets
    order = sorted(range(len(records)), key=lambda i: len(records[i].input_ids))
    rows_per_chunk = max(1, BUILD_CHUNK_ELEMENTS // vocab_size)
    was_training = teacher.training
    teacher.eval().to(device)
    try:
        with torch.no_grad(), forward_context():
            for start in range(0, len(order), batch_size):
                chosen = order[start : start + batch_size]
                sequences = datamodule.teacher_sequences([records[i] for i in chosen])  # the training batches' layout
                mask = sequences["labels"] != IGNORE_INDEX
                logits = teacher(
                    input_ids=sequences["input_ids"].to(device), attention_mask=sequences["attention_mask"].to(device)
                ).logits[..., :vocab_size]
                rows = logits[mask.to(device)]  # record after record, in order of position
                dest = np.concatenate([np.arange(offsets[i], offsets[i + 1]) for i in chosen])
                out["labels"][dest] = sequences["labels"][mask].numpy()
                for a in range(0, len(rows), rows_per_chunk):
                    view = sparse_teacher(rows[a : a + rows_per_chunk], k, temperature)
                    at = dest[a : a + rows_per_chunk]
                    view = stored(view)
                    out["values"][at] = view.values.cpu().numpy()
                    out["indices"][at] = view.indices.cpu().numpy()
                    out["log_norm"][at] = view.log_norm.float().cpu().numpy()
                    out["log_tail"][at] = view.log_tail.float().cpu().numpy()
    finally:
        teacher.train(was_training)
    for array in out.values():
        array.flush()
    del out


def stored(view: SparseTeacher) -> SparseTeacher:
    """``view`` as the cache stores it: each row shifted by its largest logit, the values in float16
    (module docstring); the probabilities it gives are the view's to float16 precision."""
    top = view.values[..., :1].float()
    return SparseTeacher((view.values.float() - top).half(), view.indices, view.log_norm.float() - top.squeeze(-1) / view.temperature,
                         view.log_tail.float(), view.temperature)


def index_dtype(vocab_size: int):
    return np.uint16 if vocab_size <= 1 << 16 else np.int32


def bytes_per_position(k: int, vocab_size: int) -> int:
    """What the cache stores per labelled position: values, indices, log_norm, log_tail, label."""
    return k * (np.dtype(np.float16).itemsize + np.dtype(index_dtype(vocab_size)).itemsize) + 3 * 4


def _settings(k: int, vocab_size: int, temperature: float, records: int, positions: int) -> dict:
    return {"k": k, "vocab_size": vocab_size, "temperature": float(temperature), "records": records, "positions": positions}


def prepare(
    k: int,
    loss,
    teacher,
    tokenizer,
    datamodule,
    vocab_size: int,
    cache_dir,
    *,
    teacher_config=None,
    precision="32-true",
    device="cpu",
    forward_context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    batch_size: int | None = None,
) -> TeacherSignals:
    """The run's cached teacher signals: loaded if an entry for this key exists and is intact, else built."""
    check_vocabulary(k, vocab_size)
    temperature = cached_temperature(loss, k)
    log.warning("%s", approximation_note(k))
    key = signal_key(teacher, tokenizer, datamodule, k, vocab_size, temperature, precision, teacher_config)
    path = Path(cache_dir).expanduser() / "teacher_signals" / key
    records = datamodule.records["train"]
    expected = _settings(k, vocab_size, temperature, len(records), sum(datamodule.teacher_positions(r) for r in records))
    signals = load(path, expected)
    if signals is not None:
        return signals
    log.info(
        "Computing the teacher's top-%d at the %d labelled positions of %d training records (first use of this "
        "teacher, data, k and temperature); they will be cached at %s",
        k,
        expected["positions"],
        len(records),
        path,
    )
    start = time.perf_counter()
    build(path, teacher, datamodule, k, vocab_size, temperature, batch_size or datamodule.batch_size, device, forward_context)
    log.info("Teacher signals cached at %s (%.1f s)", path, time.perf_counter() - start)
    return TeacherSignals(path)


def for_run(cfg, loss, teacher, tokenizer, datamodule, vocab_size: int, trainer) -> TeacherSignals:
    """:func:`prepare` with a run's settings: cache folder, precision and device of its trainer."""
    settings = cfg.teacher_cache
    return prepare(
        settings.k,
        loss,
        teacher,
        tokenizer,
        datamodule,
        vocab_size,
        cfg.paths.cache_dir,
        teacher_config=cfg.model.teacher,
        precision=cfg.trainer.get("precision"),
        device=trainer.strategy.root_device,
        forward_context=trainer.precision_plugin.forward_context,
        batch_size=settings.get("batch_size"),
    )

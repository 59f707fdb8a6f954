"""The one plan of a run: the ordered list of work every executor iterates.

From the trajectory, the memory budgets, the backend's range policy, the journal of
an interrupted run and the rank/world of an SPMD run, :func:`build` computes the
:class:`Item` s in the order they run:

* ``copy``: a tensor copied unchanged into every output;
* ``fit``: one tensor's Gram (pass 1), its solve, and its weighted sums (pass 2), over
  element ranges sized by the :class:`Policy` — resident (the whole trajectory held
  mapped between the passes: read once) or cut into ranges (read twice);
* ``group``: consecutive small tensors run as one (on the host one map per file and one
  native call per pass; on a device one read, one upload, one wait for the Grams and one
  download; one batched solve either way), bit for bit what ``fit`` writes for each;
* ``gram`` / ``combine``: pass 1 (one Gram block sum per item) and pass 2 of the piece
  of a tensor split across ranks (:mod:`.partition`), and the gram-only items of the
  diagnostics pass.

The single-process, SPMD and diagnostics executors (:mod:`.executor`) run these items;
the device pipeline reads ahead along them (:meth:`.gpu.DeviceStreamer.follow`); the
journal's records (per tensor name, up to an element) are positions in them.
"""

from __future__ import annotations

import argparse
import os
import re
import warnings
from dataclasses import dataclass, field
from operator import itemgetter

from ..errors import RelexWarning, UsageError
from ..io import dtypes
from ..io.reader import max_maps
from ..ops.reference import GRAM_CHUNK
from . import partition
from .gramsum import GRAM_BLOCK
from .trajectory import Job, Trajectory

#: working memory of the kernels besides the mapped pages (fp32 tiles, reference temporaries)
KERNEL_SCRATCH = 64 << 20
#: the smallest working budget for mapped pages: a few GRAM_CHUNKs of a large-T tensor
MIN_BUDGET = 16 << 20
#: device runs: journal points of streamed tensors at least this many input bytes apart
RANGE_BYTES = 1 << 30


def _group_max() -> int:
    """Most tensors in one group: ``RELEX_GROUP_TENSORS`` (1 turns grouping off: tests compare the
    two), else 1024; a value that is not a positive integer is ignored."""
    env = os.environ.get("RELEX_GROUP_TENSORS", "").strip()
    return int(env) if env.isdigit() and int(env) > 0 else 1024


GROUP_MAX = _group_max()
#: mapped bytes of one group at most (inputs and outputs stay mapped until the group ends):
#: enough to amortise the per-group cost over hundreds of MoE experts, small enough that a
#: dense model's groups do not hold the whole memory budget in RSS (6 GB at the default
#: budget on a 24 GB machine). 64 MB groups made the 3072-tensor benchmark ~15% slower.
GROUP_BYTES = 256 << 20
#: a tensor's place in a device group's buffers starts at a multiple of this many bytes (aligned
#: loads and stores for the device kernels, as at the start of a buffer)
GROUP_ALIGN = 256


def aligned(nbytes: int) -> int:
    return -(-nbytes // GROUP_ALIGN) * GROUP_ALIGN


def device_group_max(T: int, stage: int) -> int:
    """Most tensors in one device group: their T x T fp64 Grams fit a stage's bytes."""
    return min(GROUP_MAX, max(2, stage // (8 * T * T)))


# -- budgets ----------------------------------------------------------------------------
#: the default memory budget at most (below: a quarter of RAM)
DEFAULT_BUDGET_CAP = 1 << 30


def default_memory_budget() -> int:
    """A quarter of the machine's RAM, at most ``DEFAULT_BUDGET_CAP`` (1 GiB).

    Chosen by measurement (``benchmarks/bench_e2e.py --budgets``): on the 220m run (T = 16,
    7.5 GB) a quarter of RAM (6 GB: the 1.1 GB embedding trajectory resident, read once),
    1 GiB and 512 MiB (the embedding read twice) ran equally fast within the machine's
    noise, at 1168, 909 and 336 MiB of peak RSS. A tensor read twice is read from storage
    once whenever its trajectory fits the page cache (pass 2 follows pass 1 at once, and
    released pages stay cached), so a larger budget buys little but memory.
    """
    mem = usable_memory()
    return DEFAULT_BUDGET_CAP if mem is None else min(mem[0] // 4, DEFAULT_BUDGET_CAP)


def resolve_budget(memory_budget: int | None, ranks: int = 1, warn: bool = True) -> int:
    """The memory budget of each of ``ranks`` processes of this node: ``memory_budget``, or the
    default shared among them. A budget given past the memory there is (all ranks together) is a
    RelexWarning with ``warn``: pages planned to stay mapped would be evicted and read again."""
    if memory_budget is None:
        return max(1, default_memory_budget() // ranks)
    mem = usable_memory()
    if warn and mem is not None and memory_budget * ranks > mem[0]:
        each = f"{ranks} ranks x " if ranks > 1 else ""
        warnings.warn(f"the memory budget ({each}{memory_budget / 2**30:.1f} GiB) is more than {mem[1]} "
                      f"({mem[0] / 2**30:.1f} GiB): tensors planned to stay resident will be evicted and read "
                      "again; the default is a quarter of the memory, at most 1 GiB", RelexWarning, stacklevel=3)
    return memory_budget


def physical_ram() -> int | None:
    """The machine's RAM in bytes (None where the system does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return None


#: where a container's memory limit is (cgroup v2, v1)
CGROUP_MEMORY_LIMITS = ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes")


def usable_memory() -> tuple[int, str] | None:
    """(bytes, what) of the memory this process may use: the machine's RAM, or its container's
    limit (cgroup v2 ``memory.max``, v1 ``memory.limit_in_bytes``) where that is less."""
    best = None
    ram = physical_ram()
    if ram is not None:
        best = (ram, "this machine's RAM")
    for path in CGROUP_MEMORY_LIMITS:
        try:
            with open(path) as fh:
                limit = int(fh.read().strip())
        except (OSError, ValueError):  # (absent, or 'max': no limit)
            continue
        if best is None or limit < best[0]:
            best = (limit, "this container's memory limit")
    return best


_UNITS = {"": 1, "B": 1, "K": 1 << 10, "KB": 1000, "KIB": 1 << 10, "M": 1 << 20, "MB": 1000**2, "MIB": 1 << 20,
          "G": 1 << 30, "GB": 1000**3, "GIB": 1 << 30, "T": 1 << 40, "TB": 1000**4, "TIB": 1 << 40}


class SizeError(UsageError, argparse.ArgumentTypeError):
    """A size that does not parse: a UsageError for the API, an argparse error on the command line."""


def parse_size(text: str) -> int:
    """'512M', '4G', '1.5GB', '1000000', '1e6' -> bytes (K/M/G/T and KiB… are powers of 1024, KB… of 1000)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*", str(text))
    if not m or m.group(2).upper() not in _UNITS:
        raise SizeError(f"cannot read size {text!r} (examples: 512M, 4G, 1.5GB)")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def parse_positive_size(text: str) -> int:
    """:func:`parse_size` of a size that must hold at least one byte (a budget, a shard size)."""
    n = parse_size(text)
    if n < 1:
        raise SizeError(f"size {text!r} must be at least one byte (examples: 512M, 4G, 1.5GB)")
    return n


class Policy:
    """How a tensor is cut: whole and resident between the passes, or into element ranges.

    On the host (``device_cap`` None) a tensor is resident when its T+1 versions and its
    outputs fit the mapped-page budget; otherwise its ranges are multiples of
    ``GRAM_CHUNK`` ending on ``GRAM_BLOCK`` edges where they can (so the journal records
    the Gram there and the sum has the same bits). On a device, resident means the whole
    trajectory fits the device budget left after the pipeline's buffers (``device_cap``);
    streamed tensors get ranges of about ``RANGE_BYTES``. F64 tensors are computed on the
    host (:mod:`..ops.fp64`) and take the host rule everywhere. A device's groups are bounded by
    its ``stage`` buffer's bytes.
    """

    def __init__(self, T: int, memory_budget: int, device_cap: int | None = None, stage: int | None = None):
        if (device_cap is None) != (stage is None):
            raise ValueError("a device's Policy takes both its resident cap and its stage bytes; the host's neither")
        self.T = T
        self.budget = max(memory_budget - KERNEL_SCRATCH, MIN_BUDGET)
        self.device_cap = device_cap  # (not None: a device's policy)
        # a group's bytes at most (:meth:`group_cost`): on the host its inputs and outputs stay
        # mapped until it ends; on a device its inputs fill one stage buffer (``stage`` bytes).
        # Its tensors at most: on a device their Grams (T x T fp64 each) also fit a stage's bytes
        self.group_bytes = min(self.budget, GROUP_BYTES) if stage is None else stage
        self.group_max = GROUP_MAX if stage is None else device_group_max(T, stage)

    def group_cost(self, job: Job, n_outputs: int) -> int:
        """Bytes ``job`` adds to a group (limit: ``group_bytes``)."""
        if self.device_cap is not None and not job.on_host:
            return aligned((self.T + 1) * job.nbytes)
        return (self.T + 1 + n_outputs) * job.nbytes

    def ranges(self, job: Job, n_outputs: int) -> tuple[bool, list[tuple[int, int]]]:
        """(resident, ranges) of ``job`` when it writes ``n_outputs`` outputs."""
        isz, n = dtypes.itemsize(job.dtype), job.numel
        if self.device_cap is not None and not job.on_host:
            row = (self.T + 1) * isz
            if n * row <= self.device_cap:
                return True, [(0, n)]
            step = GRAM_BLOCK * max(1, RANGE_BYTES // (GRAM_BLOCK * row))
            return False, [(a, min(n, a + step)) for a in range(0, n, step)]
        per_elem = (self.T + 1 + n_outputs) * isz
        if n * per_elem <= self.budget:
            return True, [(0, n)]
        step = max(GRAM_CHUNK, (self.budget // per_elem) // GRAM_CHUNK * GRAM_CHUNK)
        # ranges that end on block boundaries, so the journal can record the Gram there
        step = step // GRAM_BLOCK * GRAM_BLOCK or GRAM_CHUNK << ((step // GRAM_CHUNK).bit_length() - 1)
        return False, [(a, min(n, a + step)) for a in range(0, n, step)]


# -- the work -----------------------------------------------------------------------------
@dataclass
class Item:
    """One unit of work (module docstring). Ranges are the elements still to do: a resumed
    tensor's ``gram_ranges`` start where its journalled partial Gram ends, its
    ``combine_ranges`` where its written outputs end."""

    kind: str  # "copy" | "fit" | "group" | "gram" | "combine"
    jobs: list[Job]
    resident: bool = False
    ranges: list[tuple[int, int]] = field(default_factory=list)  # the whole work, for read-ahead and the bar
    needs_gram: bool = False  # pass 1 runs (False: the fit is known, from a saved fit or the journal)
    gram_ranges: list[tuple[int, int]] = field(default_factory=list)
    combine_ranges: list[tuple[int, int]] = field(default_factory=list)
    gram_from: int = 0  # elements [0, gram_from) are in the journalled partial Gram
    also: str | None = None  # a tied head written with this tensor's values
    reused: bool = False  # finished by the interrupted run this one resumes
    reread: bool = True  # whether pass 2 reads the inputs again (False: pass 1 left them mapped)
    whole: bool = False  # the whole tensor fits the budget: read it ahead while the item before computes
    slot: int = 0  # SPMD: the item's Gram slot in the pass-1 all-reduce

    @property
    def job(self) -> Job:
        return self.jobs[0]

    def read_bytes(self, T: int) -> int:
        """Input bytes this item reads (the progress bar's share; a reused item its whole share)."""
        if self.kind == "copy":
            return self.job.nbytes
        isz = dtypes.itemsize(self.job.dtype)
        span = sum(b - a for a, b in self.ranges)
        if self.kind == "group":
            return (T + 1) * sum(j.nbytes for j in self.jobs)
        if self.kind == "gram":
            return (T + 1) * span * isz
        if self.kind == "combine":
            return (T + 1) * span * isz if self.reread else 0
        return (T + 1) * span * isz * (2 if self.reread and self.needs_gram else 1)


@dataclass
class Plan:
    """The items of one process: ``items`` run first; ``after`` (SPMD pass 2 of split pieces) once
    every rank's pass-1 block sums are known. ``slots``: Grams in the pass-1 all-reduce."""

    items: list[Item]
    after: list[Item] = field(default_factory=list)
    slots: int = 0
    slot: dict[str, int] = field(default_factory=dict)  # SPMD: a fitted tensor's first slot
    split: partition.Plan | None = None

    def read_bytes(self, T: int) -> int:
        return sum(it.read_bytes(T) for it in self.items + self.after)


class _NoJournal:
    """The journal of a run that does not resume (SPMD, diagnostics): empty, and it records nothing."""

    done: set = frozenset()
    fits: dict = {}
    grams: dict = {}
    written: dict = {}

    def record_gram(self, name: str, upto: int, acc) -> None:
        pass

    def record_fits(self, names: list[str], comps: list) -> None:
        pass

    def record_written(self, name: str, upto: int) -> None:
        pass

    def record_done(self, *names: str) -> None:
        pass


NO_JOURNAL = _NoJournal()


def ranges_from(ranges: list[tuple[int, int]], start: int) -> list[tuple[int, int]]:
    """The part of ``ranges`` at or after element ``start`` (a straddling range is cut): where a
    resumed tensor continues (the journal's position)."""
    return [(max(a, start), b) for a, b in ranges if b > start]


def build(traj: Trajectory, policy: Policy, n_targets: int, *, fitted: bool, journal=NO_JOURNAL,
          groupable=None, world: int = 1, rank: int = 0) -> Plan:
    """The plan of ``rank`` (of ``world``) writing ``n_targets`` targets.

    ``fitted``: the fits are known (``predict``): no pass 1. ``groupable(job, n_out)``: whether
    the executor's backend may run ``job`` in a group (None: no groups). ``journal``: the
    finished work of the interrupted run this one resumes.
    """
    tied_source, tied_head = (traj.tied[1], traj.tied[0]) if traj.tied else (None, None)
    T = traj.T

    def n_out(job: Job) -> int:
        return n_targets * (2 if job.name == tied_source else 1)

    split = None
    if world > 1:
        split = partition.plan(traj.jobs, T, n_targets, world, tied_source)
        mine = split.of(rank)
        whole = [p.job for p in mine if not p.split]
    else:
        mine, whole = [], [j for j in traj.jobs if j.kind != "tied"]
    items: list[Item] = []
    grouping = _Grouping(traj, policy, n_out, fitted, journal, groupable, tied_source)
    i = 0
    while i < len(whole):
        job = whole[i]
        if job.kind == "copy":
            items.append(Item("copy", [job], reused=job.name in journal.done))
            i += 1
            continue
        group = grouping.take(whole[i:])
        if len(group) > 1:
            items.append(Item("group", group, resident=True, ranges=[(0, j.numel) for j in group],
                              reread=fitted))
            i += len(group)
            continue
        items.append(fit_item(job, policy, n_out(job), fitted, journal,
                               tied_head if job.name == tied_source else None))
        i += 1
    plan = Plan(items, split=split)
    if world > 1:
        _add_pieces(plan, traj, policy, mine, n_out, fitted, tied_source, tied_head)
    return plan


def fit_item(job: Job, policy: Policy, n_out: int, fitted: bool, journal, also: str | None) -> Item:
    resident, ranges = policy.ranges(job, n_out)
    reused = job.name in journal.done and (fitted or job.name in journal.fits)
    needs_gram = not fitted and job.name not in journal.fits
    gram_from = journal.grams.get(job.name, (0, None))[0] if needs_gram else 0
    return Item("fit", [job], resident=resident, ranges=ranges, reused=reused, also=also, whole=resident,
                needs_gram=needs_gram, gram_ranges=ranges_from(ranges, gram_from) if needs_gram else [],
                combine_ranges=ranges_from(ranges, journal.written.get(job.name, 0)), gram_from=gram_from,
                # pass 2 reads anew unless pass 1 just read the whole tensor and kept it mapped
                reread=not (needs_gram and gram_from == 0 and resident))


class _Grouping:
    """Which jobs run as one group (:meth:`take`): consecutive whole fit jobs the backend can
    group, without journal state (a resumed tensor keeps the per-tensor path, which knows
    where to restart), mapped together within the memory budget and half the map cache.

    The files a group maps are counted by class of versions: the checkpoints sharing a layout
    (the usual run: every one) hold a tensor in the file of the same number, so a group maps
    (checkpoints of the class) x (distinct file numbers of its tensors) of them; a checkpoint
    without a layout (rank files, DCP) is a class of its own, counted by file. A MoE model has
    thousands of tensors: a set of every version's files per tensor, made and merged, was a
    tenth of the planning time."""

    def __init__(self, traj: Trajectory, policy: Policy, n_out, fitted: bool, journal, groupable, tied_source):
        self.policy, self.n_out, self.fitted, self.journal = policy, n_out, fitted, journal
        self.groupable, self.tied_source, self.T = groupable, tied_source, traj.T
        if groupable is None:  # grouping off: take() finds nothing, nothing to look up
            return
        names = [j.name for j in traj.jobs if j.kind == "fit"]
        classes: dict = {}
        for i, v in enumerate((traj.base, *traj.ckpts)):
            classes.setdefault(v.layout if v.layout is not None else i, []).append(v)
        #: per class: (name -> the key of its file in the class: a file number or a file, files per key)
        self.classes = []
        self.ungroupable: set[str] = set()  # tensors a host group cannot take
        for key, members in classes.items():
            if isinstance(key, int):
                files = members[0].files_of(names)
                self.classes.append((dict(zip(names, files)), 1))
                # a tensor assembled from rank files has no one address: never in a host group
                # (the device's groups read each tensor into a buffer of their own, and take any source)
                if policy.device_cap is None:
                    self.ungroupable.update(n for n, f in zip(names, files) if not f.groupable)
            else:
                entries = key.entries
                self.classes.append((dict(zip(names, map(itemgetter(0), map(entries.__getitem__, names)))),
                                     len(members)))
        # a group keeps every input file it touches mapped (a descriptor each) until it ends:
        # at most half the map cache, so that thousands of shards stay under the fd limit
        self.max_files = max(1, max_maps() // 2)

    def take(self, jobs: list[Job]) -> list[Job]:
        """The jobs from ``jobs[0]`` on that run as one group (none when grouping is off)."""
        if self.groupable is None:
            return []
        jr, group, size = self.journal, [], 0
        used = [set() for _ in self.classes]  # per class, the keys of the files the group maps
        n_files = 0
        for job in jobs[:self.policy.group_max]:
            name = job.name
            if (job.kind != "fit" or name == self.tied_source or name in jr.done or name in jr.written
                    or (not self.fitted and (name in jr.fits or name in jr.grams))
                    or job.numel > GRAM_BLOCK or not self.policy.ranges(job, self.n_out(job))[0]
                    or not self.groupable(job) or name in self.ungroupable):
                break
            size += self.policy.group_cost(job, self.n_out(job))
            new, more = [], n_files
            for u, (keys, per_key) in zip(used, self.classes):
                k = keys[name]
                if k not in u:
                    new.append((u, k))
                    more += per_key
            if group and (size > self.policy.group_bytes or more > self.max_files):
                break
            for u, k in new:
                u.add(k)
            n_files = more
            group.append(job)
        return group


def _add_pieces(plan: Plan, traj: Trajectory, policy: Policy, mine, n_out, fitted: bool, tied_source,
                tied_head) -> None:
    """SPMD: the Gram slots of the pass-1 all-reduce (each whole fitted tensor's Gram, then each
    block of a split one), the ``gram`` items of this rank's split pieces (one per block) and
    their ``combine`` items. Pieces stay mapped from pass 1 to pass 2 (read once) as far as the
    budget allows; the whole tensors before them release theirs as they go."""
    slot, n = {}, 0
    splits = {j.name for j in plan.split.split_jobs()}
    for job in traj.jobs:
        if job.kind == "fit":
            slot[job.name] = n
            n += 0 if fitted else (-(-job.numel // GRAM_BLOCK) if job.name in splits else 1)
    plan.slots, plan.slot = n, slot
    for it in plan.items:
        it.slot = slot.get(it.job.name, 0)
    held = 0
    for p in mine:
        if not p.split:
            continue
        job, T = p.job, traj.T
        need = (p.b - p.a) * (T + 1 + n_out(job)) * dtypes.itemsize(job.dtype)
        # on a device a piece is never kept between the passes: each of its Gram blocks is an
        # item of its own, and the device pipeline holds one resident trajectory at a time (the
        # next item's upload takes its place), so pass 2 streams the piece again
        on_device = policy.device_cap is not None and not job.on_host
        keep = not fitted and not on_device and held + need <= policy.budget
        held += need if keep else 0
        if keep:
            ranges = [(p.a, p.b)]
        else:
            resident, rs = policy.ranges(job, n_out(job))
            ranges = [(p.a, p.b)] if resident else [(max(a, p.a), min(b, p.b)) for a, b in rs if a < p.b and b > p.a]
        also = tied_head if job.name == tied_source else None
        if not fitted:
            for blk in p.blocks:
                lo, hi = blk * GRAM_BLOCK, min(job.numel, (blk + 1) * GRAM_BLOCK)
                sub = [(max(a, lo), min(b, hi)) for a, b in ranges if a < hi and b > lo]
                plan.items.append(Item("gram", [job], resident=keep, ranges=sub, needs_gram=True, gram_ranges=sub,
                                       slot=slot[job.name] + blk))
        plan.after.append(Item("combine", [job], resident=keep, ranges=ranges, combine_ranges=ranges, also=also,
                               reread=not keep))


def diagnostics(traj: Trajectory, policy: Policy) -> Plan:
    """The gram-only plan of the diagnostics pass: every fitted tensor's Gram over all the
    checkpoints, each range's pages released at once (no pass 2 follows)."""
    items = []
    for job in traj.jobs:
        if job.kind == "fit":
            whole, ranges = policy.ranges(job, 0)
            items.append(Item("gram", [job], ranges=ranges, needs_gram=True, gram_ranges=ranges, whole=whole))
    return Plan(items)

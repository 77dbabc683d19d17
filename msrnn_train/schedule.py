"""The bounded multi-state process, computed as an eviction schedule.

Three forms of the same process (see ../shared semantics):

* `reference_schedule` – the spec, in plain Python sets, one sequence and one head group at a
  time. Slow; used by tests only.
* `scan`               – the same step process vectorised over batch and head groups, on a
  fixed set of K+1 slots. It is what teacher forcing *and* the inference cache run, so the
  two cannot drift apart: teacher forcing calls it once over the whole sequence, the cache
  calls it for the tokens of each forward starting from the slots it holds.
* `kernels/`          – fast scans (numba on the CPU, Triton on CUDA) checked against `scan`
  on fresh random inputs (tests/test_kernels.py).

One step t (only for real tokens; padding never occupies a state):
  1. keys that left the model's own sliding window (pos_j <= pos_t - W) are dropped;
  2. C_t = H_{t-1} + {t}; query t attends over C_t;
  3. if |C_t| > K the policy drops exactly one member (ties: the oldest).
The schedule is one number per key: its eviction step e_j (the last query that sees it).
Query t sees key j iff arrive_j <= t <= e_j.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

from .policies import Policy

NEVER = 2**62  # eviction step of a key still held at the end


@dataclass
class Slots:
    """Held members of one layer: per (batch, group) up to C slots.

    src   – index of the member in the key tensor of the current call (-1: empty slot)
    order – the member's index among its sequence's real tokens (for recency and sinks)
    pos   – the member's column index (cache position; for the model's sliding window)
    acc   – accumulated attention mass (h2o)
    """

    src: torch.Tensor
    order: torch.Tensor
    pos: torch.Tensor
    acc: torch.Tensor

    @classmethod
    def empty(cls, batch: int, groups: int, capacity: int, device) -> "Slots":
        shape = (batch, groups, capacity)
        return cls(
            src=torch.full(shape, -1, dtype=torch.long, device=device),
            order=torch.zeros(shape, dtype=torch.long, device=device),
            pos=torch.zeros(shape, dtype=torch.long, device=device),
            acc=torch.zeros(shape, dtype=torch.float32, device=device),
        )

    @property
    def held(self) -> torch.Tensor:
        return self.src >= 0

    def grow(self, capacity: int) -> "Slots":
        extra = capacity - self.src.shape[-1]
        if extra <= 0:
            return self
        pad = Slots.empty(self.src.shape[0], self.src.shape[1], extra, self.src.device)
        return Slots(*(torch.cat([a, b], -1) for a, b in zip(
            (self.src, self.order, self.pos, self.acc), (pad.src, pad.order, pad.pos, pad.acc))))


@dataclass
class Schedule:
    """Result of running the process over the T queries of one call.

    evict  – (B, G, S) the query index (0..T-1) at which each key was dropped; NEVER if it is
             still held at the end; -1 if it is never visible (padding, empty slot, expired).
    arrive – (S,) the first query index that may see each key (-1 for keys held before the call).
    final  – the slots held after the last query.
    """

    evict: torch.Tensor
    arrive: torch.Tensor
    final: Slots
    soft: "SoftRows | None" = None  # what soft mode needs, when the scan was asked for it (relaxable policies)
    cache: dict = field(default_factory=dict, repr=False, compare=False)  # e.g. flex block masks

    def visible(self, query_valid: torch.Tensor | None = None) -> torch.Tensor:
        """Dense (B, G, T, S) bool mask: query t sees key j. CPU / reference path only.

        Padding query rows see their own key, so attention over them stays finite.
        """
        S = self.arrive.numel()
        # the number of queries: from query_valid when given (no host sync), else from arrive
        T = query_valid.shape[1] if query_valid is not None else S - int((self.arrive < 0).sum())
        t = torch.arange(T, device=self.evict.device).view(1, 1, T, 1)
        vis = (self.arrive.view(1, 1, 1, S) <= t) & (t <= self.evict.unsqueeze(2))
        if query_valid is not None:
            P = S - T
            diag = torch.arange(S, device=vis.device).view(1, S) == (P + torch.arange(T, device=vis.device)).view(T, 1)
            vis = vis | (diag & ~query_valid.view(-1, 1, T, 1))
        return vis


@dataclass
class SoftRows:
    """Per policy eviction, what soft mode (soft.py) needs besides the schedule, emitted by the
    scan when asked (`soft_rows=True`, relaxable policies: `Policy.relaxable`, TOVA):

    runner – (B, G, S) for each key the policy dropped, the key it would have dropped next (the
             runner-up at that step: lowest score among the rest, ties toward the oldest); -1 for
             keys not dropped by the policy (held, padding, expired from the sliding window)
    lse    – (B, Hq, T) fp32 per query head, log of the softmax normaliser of query t over C_t
             (its held set), at the steps with a policy eviction (0 elsewhere)
    """

    runner: torch.Tensor
    lse: torch.Tensor


def emits_soft_rows(policy: Policy | None, budget: int | None) -> bool:
    """Whether the scan emits `SoftRows` for a policy: the relaxable ones (`Policy.relaxable`)."""
    return policy is not None and budget is not None and policy.relaxable


def scan(
    policy: Policy | None,
    budget: int | None,
    logits: "LogitRows | None",
    new_valid: torch.Tensor,
    new_order: torch.Tensor,
    new_pos: torch.Tensor,
    init: Slots | None = None,
    window: int | None = None,
    groups: int = 1,
    soft_rows: bool = False,
    new_value: torch.Tensor | None = None,
) -> Schedule:
    """Run the bounded process for T new tokens, starting from the held slots `init`.

    policy/budget – the selection rule and K (None/None: unbounded, only the sliding window drops)
    logits        – LogitRows giving q_t . k_j * scale (fp32) for the keys of this call
    new_valid     – (B, T) real (non-padding) tokens
    new_order     – (B, T) each token's index among its sequence's real tokens
    new_pos       – (T,) column index of each query/new key (the model's sliding window uses it)
    init          – slots held before this call; key index s < P refers to slot s of init
    groups        – 1 for layer-wise policies, the number of key/value heads for head-wise ones
    soft_rows     – also emit `SoftRows` (relaxable policies; ignored for the others)
    new_value     – (B, G, T) the value each new token carries (policies that `carries_value`: the
                    learned retention logit), written into its slot's `acc` when it arrives; None: 0
    """
    B, T = new_valid.shape
    device = new_valid.device
    P = 0 if init is None else init.src.shape[-1]
    S = P + T
    unbounded = policy is None or budget is None
    capacity = P + T if unbounded else max(budget + 1, P + 1)
    slots = Slots.empty(B, groups, capacity, device) if init is None else init.grow(capacity)
    slots = Slots(slots.src.clone(), slots.order.clone(), slots.pos.clone(), slots.acc.clone())

    # evict has one spare column S: scatters of "no-op" rows land there and are cut off at the end
    evict = torch.full((B, groups, S + 1), NEVER, dtype=torch.long, device=device)
    if P:
        held0 = init.src >= 0
        evict[:, :, :P] = torch.where(held0, NEVER, -1).expand(B, groups, P)
    evict[:, :, P:S] = torch.where(new_valid, NEVER, -1).unsqueeze(1).expand(B, groups, T)

    needs_scores = policy is not None and policy.needs_scores and not unbounded
    accumulates = needs_scores and policy.accumulates
    new_pos = new_pos.to(device)
    emit = None
    if soft_rows and emits_soft_rows(policy, budget):
        emit = SoftRows(runner=torch.full((B, groups, S + 1), -1, dtype=torch.long, device=device),
                        lse=torch.zeros(B, logits.q.shape[1], T, dtype=torch.float32, device=device))

    with _few_threads(device):
        _run_steps(T, policy, budget, logits, slots, evict, new_valid, new_order, new_pos, P, S, groups,
                   unbounded, needs_scores, accumulates, window, emit, new_value)

    evict = evict[:, :, :S]
    arrive = torch.cat([torch.full((P,), -1, dtype=torch.long, device=device),
                        torch.arange(T, device=device)])
    if emit is not None:
        emit = SoftRows(runner=emit.runner[:, :, :S].contiguous(), lse=emit.lse)
    return Schedule(evict=evict, arrive=arrive, final=slots, soft=emit)


def _run_steps(T, policy, budget, logits, slots, evict, new_valid, new_order, new_pos, P, S, groups,
               unbounded, needs_scores, accumulates, window, emit=None, new_value=None):
    for t in range(T):
        if bool(new_valid[:, t].any()):
            _step(t, policy, budget, logits, slots, evict, new_valid, new_order, new_pos, P, S, groups,
                  unbounded, needs_scores, accumulates, emit, new_value)
        # the model's own sliding window: a key at column p is seen by queries up to p + W - 1,
        # so it leaves at the end of step p + W - 1 (for every sequence, padding or not)
        if window is not None:
            expired = (slots.src >= 0) & (slots.pos <= new_pos[t] + 1 - window)
            if bool(expired.any()):
                evict.scatter_(2, torch.where(expired, slots.src, S), t)
                evict[:, :, S] = NEVER
                slots.src = torch.where(expired, -1, slots.src)


@contextlib.contextmanager
def _few_threads(device):
    """The steps are tiny tensor ops: on the CPU, OpenMP's fork/join costs more than the work
    (milliseconds per op on a busy 2-core machine), so the loop runs on one thread."""
    if torch.device(device).type != "cpu":
        yield
        return
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _step(t, policy, budget, logits, slots, evict, new_valid, new_order, new_pos, P, S, groups,
          unbounded, needs_scores, accumulates, emit=None, new_value=None):
    """One step of the process for query/key t (rows whose token t is padding do nothing)."""
    B = new_valid.shape[0]
    valid = new_valid[:, t].view(B, 1)  # (B, 1), broadcast over groups
    # C_t = H_{t-1} + {t}: the new token takes a free slot
    free = (slots.src < 0).to(torch.int8).argmax(-1, keepdim=True)  # (B, G, 1)
    _put(slots.src, free, valid, P + t)
    _put(slots.order, free, valid, new_order[:, t].view(B, 1, 1))
    _put(slots.pos, free, valid, new_pos[t])
    _put(slots.acc, free, valid, 0.0 if new_value is None else new_value[:, :, t:t + 1].float())
    if unbounded:
        return
    held = slots.src >= 0
    need = (held.sum(-1) > budget) & valid  # (B, G)
    if not (accumulates or bool(need.any())):
        return
    # query t's probabilities over C_t, then the policy's choice
    score = lse = None
    if needs_scores:
        score, lse = _scores(logits.row(t), slots.src, held, groups, with_lse=True)
        if accumulates:
            slots.acc.copy_(slots.acc + torch.where(held & valid.unsqueeze(-1), score, 0.0))
        if not bool(need.any()):
            return
    victim = pick_victim(policy, held, slots.order, score, slots.acc)  # (B, G)
    vsrc = slots.src.gather(2, victim.unsqueeze(-1)).squeeze(-1)
    evict.scatter_(2, torch.where(need, vsrc, S).unsqueeze(-1), t)
    if emit is not None:  # the runner-up: the policy's choice among the rest of C_t
        rest = held.scatter(2, victim.unsqueeze(-1), False)
        runner = slots.src.gather(2, pick_victim(policy, rest, slots.order, score, slots.acc).unsqueeze(-1))
        emit.runner.scatter_(2, torch.where(need, vsrc, S).unsqueeze(-1), runner)
        emit.runner[:, :, S] = -1
        Hq = lse.shape[1]
        need_h = need.repeat_interleave(Hq // groups, dim=1) if groups > 1 else need.expand(B, Hq)
        emit.lse[:, :, t] = torch.where(need_h, lse, emit.lse[:, :, t])
    slots.src.scatter_(2, victim.unsqueeze(-1), torch.where(need, -1, vsrc).unsqueeze(-1))


def pick_victim(policy: Policy, held, order, score, acc) -> torch.Tensor:
    """Index of the slot to drop per (batch, group): lowest priority among the eligible,
    ties toward the oldest member."""
    eligible = policy.eligible(held, order)
    prio = policy.priority(score, acc, order).float()
    prio = torch.where(eligible, prio, torch.inf)
    lowest = prio.min(-1, keepdim=True).values
    tied = eligible & (prio == lowest)
    return torch.where(tied, order, torch.iinfo(torch.long).max).argmin(-1)


def decode_step(policy: Policy, budget: int, row: torch.Tensor | None, held: torch.Tensor, order: torch.Tensor,
                pos: torch.Tensor, acc: torch.Tensor, valid: torch.Tensor, new_pos: int, window: int | None,
                groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The step of `_step` (and the window expiry of `_run_steps`) for one new token on fixed
    slots, written without a branch on tensor values, so a decoding step never waits for the
    device. The BoundedCache runs it on its K + 1 slot buffer; tests/test_inference.py checks it
    against `scan` on fresh random inputs.

    held  – (B, G, C) C_t: the members held before the step plus the new token's slot
    row   – (B, Hq, C) fp32 logits q_t . k_slot * scale (None when the policy needs no scores)
    valid – (B,) whether the new token is real (a padding token changes nothing)
    Returns the held mask and accumulated mass after the step.
    """
    B, G, C = held.shape
    valid = valid.view(B, 1)
    need = (held.sum(-1) > budget) & valid  # (B, G)
    score = None
    if policy.needs_scores:
        src = torch.where(held, torch.arange(C, device=held.device), -1)
        score = _scores(row, src, held, groups)
        if policy.accumulates:
            acc = acc + torch.where(held & valid.unsqueeze(-1), score, 0.0)
    victim = pick_victim(policy, held, order, score, acc)  # (B, G)
    drop = (torch.arange(C, device=held.device) == victim.unsqueeze(-1)) & need.unsqueeze(-1)
    held = held & ~drop
    if window is not None:  # the model's sliding window: a key at column p leaves after query p + W - 1
        held = held & (pos > new_pos + 1 - window)
    return held, acc


def _put(t: torch.Tensor, idx: torch.Tensor, valid: torch.Tensor, value) -> None:
    """t[b, g, idx[b, g]] = value where valid[b]."""
    current = t.gather(2, idx)
    value = torch.as_tensor(value, dtype=t.dtype, device=t.device)
    t.scatter_(2, idx, torch.where(valid.unsqueeze(-1), value.expand_as(current) if value.dim() else value, current))


def _scores(row: torch.Tensor, src: torch.Tensor, held: torch.Tensor, groups: int, with_lse: bool = False):
    """Current query's attention probabilities over the held slots, averaged over the query
    heads of each group. row: (B, Hq, S) fp32 logits; returns (B, G, C) (and with `with_lse`
    each query head's log normaliser over the held slots, (B, Hq))."""
    B, Hq, S = row.shape
    C = src.shape[-1]
    idx = src.clamp(min=0)
    per_group = Hq // groups
    lg = row.view(B, groups, per_group, S).gather(3, idx.unsqueeze(2).expand(B, groups, per_group, C))
    lg = lg.masked_fill(~held.unsqueeze(2), -torch.inf)
    p = torch.softmax(lg, dim=-1).nan_to_num(0.0)
    if with_lse:
        return p.mean(2), torch.logsumexp(lg, dim=-1).reshape(B, Hq)
    return p.mean(2)


class LogitRows:
    """q_t . k_j * scale in fp32, computed block by block of queries so that the whole
    T x S matrix never has to exist at once. GQA: the query heads of a key/value head are a
    view (B, Hkv, Hq/Hkv, ...) against that head's keys, never a copy of the keys per query head."""

    def __init__(self, query: torch.Tensor, key: torch.Tensor, scale: float, block: int = 256):
        self.q = query  # (B, Hq, T, D)
        self.k = key  # (B, Hkv, S, D)
        self.scale = scale
        self.block = block
        self._start = None
        self._rows = None

    def block_rows(self, start: int) -> torch.Tensor:
        """(B, Hq, rows, P + start + rows) fp32 logits of queries start .. start + block against
        the keys they can reach (the P held before the call and the causal prefix)."""
        if self._start != start:
            self._start = start
            q = self.q[:, :, start:start + self.block].float()
            B, Hq, rows, D = q.shape
            Hkv = self.k.shape[1]
            reach = self.k.shape[2] - self.q.shape[2] + start + rows
            k = self.k[:, :, :reach].float().unsqueeze(2)  # (B, Hkv, 1, reach, D)
            with torch.autocast(q.device.type, enabled=False):  # fp32 scores under bf16 training, as at inference
                rows_ = torch.matmul(q.view(B, Hkv, Hq // Hkv, rows, D), k.transpose(-1, -2)) * self.scale
            self._rows = rows_.view(B, Hq, rows, reach)
        return self._rows

    def row(self, t: int) -> torch.Tensor:
        return self.block_rows((t // self.block) * self.block)[:, :, t % self.block]


def unbounded_schedule(new_valid, new_pos, init: Slots | None, window: int | None, groups: int) -> Schedule:
    """Closed form of the process for a layer that keeps everything (only the model's sliding
    window drops): equal to `scan(None, None, ...)`, without the loop."""
    B, T = new_valid.shape
    device = new_valid.device
    P = 0 if init is None else init.src.shape[-1]
    key_pos = new_pos.view(1, 1, T).expand(B, groups, T)
    key_ok = new_valid.view(B, 1, T).expand(B, groups, T)
    if P:
        key_pos = torch.cat([init.pos, key_pos], -1)
        key_ok = torch.cat([init.src >= 0, key_ok], -1)
    if window is None:
        evict = torch.full(key_pos.shape, NEVER, dtype=torch.long, device=device)
    else:
        # a key at column p leaves at the end of the step at column p + W - 1
        last = torch.searchsorted(new_pos.contiguous(), (key_pos + window - 1).reshape(-1)).view_as(key_pos)
        evict = torch.where(last >= T, NEVER, last)
    evict = torch.where(key_ok, evict, -1)
    arrive = torch.cat([torch.full((P,), -1, dtype=torch.long, device=device), torch.arange(T, device=device)])
    return Schedule(evict=evict, arrive=arrive, final=None)


def rolling_schedule(policy: Policy, budget: int, new_valid: torch.Tensor, new_order: torch.Tensor,
                     groups: int = 1) -> Schedule:
    """Closed form of a rolling policy (one whose `rolling_sinks()` is i, not None: window, i = 0;
    sinks, i = min(n_sinks, K - 1)) under teacher forcing from an empty state (no model sliding
    window): its first i tokens stay, every other key leaves when the real token `span` = K - i
    places after it arrives. Equal to `scan` (tested); O(T) tensor ops instead of T steps."""
    B, T = new_valid.shape
    device = new_valid.device
    n_sinks = policy.rolling_sinks()
    span = budget - n_sinks
    col_of_order = torch.full((B, T + 1), NEVER, dtype=torch.long, device=device)
    cols = torch.arange(T, device=device).expand(B, T)
    col_of_order.scatter_(1, torch.where(new_valid, new_order, T), torch.where(new_valid, cols, NEVER))
    col_of_order[:, T] = NEVER
    target = (new_order + span).clamp(max=T)
    evict = col_of_order.gather(1, target)
    evict = torch.where(new_order < n_sinks, NEVER, evict)
    evict = torch.where(new_valid, evict, -1)
    return Schedule(evict=evict.unsqueeze(1).expand(B, groups, T).contiguous(),
                    arrive=torch.arange(T, device=device), final=None)


# ---------------------------------------------------------------------------------------
# The spec, in plain Python: one sequence, one head group, a set of held keys.
# ---------------------------------------------------------------------------------------
def reference_schedule(
    policy: Policy | None,
    budget: int | None,
    query: torch.Tensor,
    key: torch.Tensor,
    scale: float,
    valid: torch.Tensor,
    window: int | None = None,
    head_wise: bool = False,
    values: torch.Tensor | None = None,
) -> list[list[dict[int, int]]]:
    """Eviction steps by the letter of the semantics, for teacher forcing from an empty state.

    query (B, Hq, T, D), key (B, Hkv, T, D), valid (B, T); values (B, G, T): what each token
    carries for a policy that `carries_value` (None: 0). Returns, per batch element and per
    head group (one group unless head_wise), a dict {key column: eviction step} for every real
    key (NEVER if still held at the end).
    """
    B, Hq, T, _ = query.shape
    Hkv = key.shape[1]
    per_kv = Hq // Hkv
    groups = Hkv if head_wise else 1
    out = []
    for b in range(B):
        real = [t for t in range(T) if bool(valid[b, t])]
        order = {t: i for i, t in enumerate(real)}
        per_group = []
        for g in range(groups):
            heads = range(g * per_kv, (g + 1) * per_kv) if head_wise else range(Hq)
            held: list[int] = []
            acc: dict[int, float] = {}
            evict: dict[int, int] = {t: NEVER for t in real}
            for t in range(T):
                if t in order:
                    carried = 0.0 if values is None else float(values[b, g, t])
                    held = _reference_step(policy, budget, t, held, heads, per_kv, query[b], key[b], scale,
                                           order, acc, evict, carried)
                if window is not None:  # leaves after the last query of its window
                    for j in [j for j in held if j <= t + 1 - window]:
                        held.remove(j)
                        evict[j] = t
            per_group.append(evict)
        out.append(per_group)
    return out


def _reference_step(policy, budget, t, held, heads, per_kv, query, key, scale, order, acc, evict, carried=0.0):
    C = held + [t]
    acc[t] = carried
    scores = {j: 0.0 for j in C}
    if policy is not None and policy.needs_scores:
        for h in heads:
            logits = torch.stack([(query[h, t].double() @ key[h // per_kv, j].double()) * scale for j in C])
            for j, p in zip(C, torch.softmax(logits, 0).tolist()):
                scores[j] += p / len(heads)
        for j in C:
            acc[j] += scores[j]
    if policy is None or budget is None or len(C) <= budget:
        return C
    victim = _reference_victim(policy, C, order, scores, acc)
    evict[victim] = t
    return [j for j in C if j != victim]


def _reference_victim(policy, C, order, scores, acc) -> int:
    """The policy's own rule (`eligible`, `priority`) asked about C_t alone, in double precision:
    the lowest priority among the eligible members, ties toward the oldest."""
    by_age = sorted(C, key=lambda j: order[j])

    def members(values: dict, dtype) -> torch.Tensor:  # (1, 1, |C_t|): one sequence, one group
        return torch.tensor([values[j] for j in by_age], dtype=dtype).view(1, 1, -1)

    o = members(order, torch.long)
    ok = policy.eligible(torch.ones_like(o, dtype=torch.bool), o).flatten().tolist()
    prio = policy.priority(members(scores, torch.float64), members(acc, torch.float64), o).flatten().tolist()
    return min((p, age, j) for age, (j, p, e) in enumerate(zip(by_age, prio, ok)) if e)[2]

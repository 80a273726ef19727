"""kdlab.exposure: MiniLLM's excess accumulated error against an exact enumeration on a toy pair."""

import itertools
import math
from types import SimpleNamespace

import torch

from kdlab.exposure import accumulated_error, excess_accumulated_error

V, EOS, PAD = 4, 3, 0


class Markov(torch.nn.Module):
    """A toy LM whose next-token logits depend on the last token only: table[last] (V, V)."""

    def __init__(self, table):
        super().__init__()
        self.table = torch.as_tensor(table, dtype=torch.float32)

    def forward(self, input_ids, attention_mask=None, past_key_values=None, use_cache=False, **_):
        history = input_ids if past_key_values is None else torch.cat([past_key_values, input_ids], 1)
        logits = self.table[history[:, -input_ids.shape[1] :]]
        return SimpleNamespace(logits=logits, past_key_values=history if use_cache else None)


def exact_accumulated(p_table, q_table, sampler_table, start, length):
    """Σ_{t≤l} E_{prefix ~ sampler} KL(p‖q), enumerating every prefix (<eos> ends a sequence)."""
    log_p, log_q, log_s = (torch.as_tensor(t, dtype=torch.float64).log_softmax(-1) for t in (p_table, q_table, sampler_table))
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)  # per last token
    out = []
    for l in range(1, length + 1):
        total = 0.0
        for t in range(l):
            for prefix in itertools.product(range(V), repeat=t):  # tokens generated before step t
                if EOS in prefix[:-1] or (prefix and prefix[-1] == EOS):
                    continue
                prob, last = 1.0, start
                for tok in prefix:
                    prob *= math.exp(log_s[last, tok])
                    last = tok
                total += prob * float(kl[last])
        out.append(total)
    return torch.tensor(out, dtype=torch.float64)


def test_accumulated_error_matches_the_exact_enumeration():
    torch.manual_seed(0)
    p, q = torch.randn(V, V), torch.randn(V, V)
    student, teacher = Markov(q), Markov(p)
    n, length = 20000, 3
    ids = torch.full((n, 2), 1)  # prompt "1 1": the first step conditions on token 1
    mask = torch.ones_like(ids)
    kwargs = dict(eos_token_id=EOS, pad_token_id=PAD, max_new_tokens=length, generator=torch.Generator().manual_seed(0), use_cache=False)
    own = accumulated_error(student, teacher, ids, mask, sampler=student, **kwargs).mean(0)
    oracle = accumulated_error(student, teacher, ids, mask, sampler=teacher, **kwargs).mean(0)
    exact_own, exact_oracle = exact_accumulated(p, q, q, 1, length), exact_accumulated(p, q, p, 1, length)
    assert (exact_own - exact_oracle)[1:].abs().min() > 0.05  # the two prefix distributions are told apart
    torch.testing.assert_close(own.double(), exact_own, rtol=0.03, atol=1e-3)
    torch.testing.assert_close(oracle.double(), exact_oracle, rtol=0.03, atol=1e-3)
    # the first step has no generated prefix: both measure the same single KL exactly
    assert abs(float(own[0] - oracle[0])) < 1e-5


def test_a_student_equal_to_the_teacher_accumulates_no_error():
    table = torch.randn(V, V)
    ids, mask = torch.ones(8, 2, dtype=torch.long), torch.ones(8, 2, dtype=torch.long)
    kw = dict(eos_token_id=EOS, pad_token_id=PAD, max_new_tokens=4, generator=torch.Generator().manual_seed(1), use_cache=False)
    err = accumulated_error(Markov(table), Markov(table), ids, mask, sampler=Markov(table), **kw)
    assert err.abs().max() < 1e-6


def test_excess_error_is_the_relative_excess_of_the_means():
    own = torch.tensor([[1.0, 3.0], [3.0, 5.0]])
    oracle = torch.tensor([[1.0, 2.0], [1.0, 2.0]])
    torch.testing.assert_close(excess_accumulated_error(own, oracle), torch.tensor([1.0, 1.0]))

"""Parameter cases for the trt_layers parity tests: one list per component, readable ids.

Ids read ``component[-bug]-backend-layout-dtype-bB-sS-pP`` so that ``pytest -k rope`` (or gqa,
mlp, ...) selects a component, ``-k onnx`` a backend and ``-k fp16`` a dtype.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import pytest

from conftest import DTYPES, KV_LAYOUTS
from parity.backends import CANDIDATES
from reference.inputs import CaseShape
from trt_layers.bugs import BUGS, Bug

BATCHES = (1, 3)
SEQ_LENS = (1, 7, 64)
PAST_LENS = (0, 5, 100)
# Components whose result depends on the cache length (rope through its position offset).
USES_PAST = ("rope", "gqa_unmasked", "decoder_layer", "causal_lm")


@dataclass(frozen=True)
class Case:
    component: str
    backend: str
    layout: str  # a key of conftest.LAYOUTS
    dtype: str  # a key of DTYPES
    shape: CaseShape
    bug: Bug | None = None

    @property
    def id(self) -> str:
        s = self.shape
        head = f"{self.component}-{self.bug.name}" if self.bug else self.component
        return f"{head}-{self.backend}-{self.layout}-{self.dtype}-b{s.batch}-s{s.seq_len}-p{s.past_len}"


def _marks(backend: str) -> list:
    return [pytest.mark.trtllm] if backend == "trtllm" else []


def _param(case: Case):
    return pytest.param(case, id=case.id, marks=_marks(case.backend))


def backend_params() -> list:
    """One param per candidate backend, for tests that take a ``backend`` name."""
    return [pytest.param(backend, id=backend, marks=_marks(backend)) for backend in CANDIDATES]


def parity_cases(component: str) -> list:
    """Every backend x KV layout x dtype x batch x sequence (x cache length where it matters), and
    tiny-variant (theta, eps and heads unlike DeciCoder-1b's) in fp32, prefill and decode."""
    pasts = PAST_LENS if component in USES_PAST else (0,)
    grid = itertools.product(CANDIDATES, KV_LAYOUTS, DTYPES, BATCHES, SEQ_LENS, pasts)
    cases = [Case(component, backend, layout, dtype, CaseShape(batch, seq, past))
             for backend, layout, dtype, batch, seq, past in grid]
    variant_pasts = PAST_LENS[:2] if component in USES_PAST else (0,)
    cases += [Case(component, backend, "variant", "fp32", CaseShape(3, 7, past))
              for backend in CANDIDATES for past in variant_pasts]
    return [_param(case) for case in cases]


def bug_cases(component: str) -> list:
    """Each catalog bug that this component's check must catch, on every backend.

    fp32 and GQA 4:1: two KV heads of four query heads each, so that a KV-head order bug shows.
    """
    return [_param(Case(component, backend, "kvheads2", "fp32", bug.shape, bug))
            for bug in BUGS.values() if bug.component == component and bug.shows.quant is None
            and not bug.shows.tp
            for backend in CANDIDATES]  # a quantized layout's bugs: test_quant


def assert_bug_localized(result, bug: Bug) -> None:
    first = result.first_failure
    assert first is not None, f"{bug.name} ({bug.description}) went unnoticed:\n{result.table()}"
    assert first.name == bug.first_tap, (
        f"{bug.name}: expected the first divergence at {bug.first_tap}, got {first.name}\n{result.table()}")

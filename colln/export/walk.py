"""The float selection path, found once for every graph dialect colln writes.

Pruning ranks tokens by the Col-Ln score: the nodes between a ``Softmax`` and the ``TopK`` it feeds
on a path that passes no matrix product (head mean, ``A^n``, column sums, the [CLS] row, the rescue
mask). That path must stay float: fp16 keeps it fp32 (:mod:`colln.export.precision`), int8 keeps
quantization off it (:mod:`colln.export.quantize` for ONNX, :mod:`colln.export.openvino` for the
IR). :func:`selection_path` walks it over a :class:`GraphView`, a read-only view of nodes, their op
types and their edges, with one adapter per dialect (:class:`OnnxView`, :class:`OpenVinoView`);
:data:`DIALECTS` says which op types start, end and block the path in each.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable, Iterable
from dataclasses import dataclass
from typing import Protocol

import onnx


@dataclass(frozen=True)
class Dialect:
    """A graph dialect's op types: where a selection path starts (the attention ``softmax``) and
    ends (``topk``), what it never passes (``products``: a score never passes a matrix product
    between its Softmax and its TopK; attention output does) and its LayerNorm (``norms``)."""

    softmax: str
    topk: str
    products: frozenset[str]
    norms: frozenset[str]


DIALECTS = {
    "onnx": Dialect(
        softmax="Softmax",
        topk="TopK",
        products=frozenset({"MatMul", "Gemm", "Einsum", "Conv"}),
        norms=frozenset({"LayerNormalization"}),
    ),
    "openvino": Dialect(
        softmax="Softmax",
        topk="TopK",
        products=frozenset({"MatMul", "Convolution", "ScaledDotProductAttention"}),
        norms=frozenset({"MVN"}),
    ),
}


class GraphView(Protocol):
    """Nodes by a hashable key, in graph order, with their op types and neighbours."""

    dialect: Dialect

    def nodes(self) -> list[Hashable]: ...

    def op_type(self, node: Hashable) -> str: ...

    def name(self, node: Hashable) -> str: ...

    def consumers(self, node: Hashable) -> list[Hashable]: ...

    def producers(self, node: Hashable) -> list[Hashable]: ...


class OnnxView:
    """An ONNX ``GraphProto`` as a :class:`GraphView`; a node's key is its index in ``graph.node``."""

    dialect = DIALECTS["onnx"]

    def __init__(
        self,
        graph: onnx.GraphProto,
    ) -> None:
        self._nodes = graph.node
        self._consumers: dict[str, list[int]] = {}
        self._producer: dict[str, int] = {}
        for i, node in enumerate(graph.node):
            for x in node.input:
                self._consumers.setdefault(x, []).append(i)
            for x in node.output:
                self._producer[x] = i

    def nodes(self) -> list[int]:
        return list(range(len(self._nodes)))

    def op_type(self, node: int) -> str:
        return self._nodes[node].op_type

    def name(self, node: int) -> str:
        return self._nodes[node].name

    def consumers(self, node: int) -> list[int]:
        return [j for x in self._nodes[node].output for j in self._consumers.get(x, [])]

    def producers(self, node: int) -> list[int]:
        return [self._producer[x] for x in self._nodes[node].input if x in self._producer]


class OpenVinoView:
    """An ``openvino.Model`` as a :class:`GraphView`; a node's key is its unique ``get_name()``,
    its :meth:`name` the friendly name NNCF's ignored scope and colln's messages use."""

    dialect = DIALECTS["openvino"]

    def __init__(
        self,
        model,
    ) -> None:
        ops = list(model.get_ordered_ops())
        self._order = [n.get_name() for n in ops]
        self._op = {n.get_name(): n.get_type_name() for n in ops}
        self._name = {n.get_name(): n.get_friendly_name() for n in ops}
        self._consumers = {
            n.get_name(): [t.get_node().get_name() for o in n.outputs() for t in o.get_target_inputs()] for n in ops
        }
        self._producers = {n.get_name(): [i.get_source_output().get_node().get_name() for i in n.inputs()] for n in ops}

    def nodes(self) -> list[str]:
        return list(self._order)

    def op_type(self, node: str) -> str:
        return self._op[node]

    def name(self, node: str) -> str:
        return self._name[node]

    def consumers(self, node: str) -> list[str]:
        return list(self._consumers[node])

    def producers(self, node: str) -> list[str]:
        return list(self._producers[node])


def reach(
    view: GraphView,
    starts: Iterable[Hashable],
    *,
    down: bool,
    stop: frozenset[str],
) -> list[Hashable]:
    """``starts`` and every node reached from them (through consumers when ``down``, else through
    producers), breadth first; a node whose op type is in ``stop`` is listed but not passed (a
    start too)."""
    step = view.consumers if down else view.producers
    order = list(dict.fromkeys(starts))
    seen, todo = set(order), deque(n for n in order if view.op_type(n) not in stop)
    while todo:
        for j in step(todo.popleft()):
            if j not in seen:
                seen.add(j)
                order.append(j)
                if view.op_type(j) not in stop:
                    todo.append(j)
    return order


def selection_path(
    view: GraphView,
) -> set[Hashable]:
    """The nodes on a path from a Softmax to a TopK that passes no matrix product (both ends
    included), in ``view``'s dialect."""
    d = view.dialect
    nodes = view.nodes()
    below = reach(view, [n for n in nodes if view.op_type(n) == d.softmax], down=True, stop=d.products)
    above = reach(view, [n for n in nodes if view.op_type(n) == d.topk], down=False, stop=d.products)
    return {n for n in set(below) & set(above) if view.op_type(n) not in d.products}

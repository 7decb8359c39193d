"""Tensor-parallel ranks on the CPU stand-in: each rank a process, its lowered graph cut at the collectives,
the collectives run by torch.distributed between the pieces (gloo on CPU; NCCL, one GPU a rank, where the machine
has a GPU for every rank).

ONNX Runtime cannot run TensorRT-LLM's NCCL plugins, so the lowering marks allreduce and allgather as nodes
of its own domain (lowering.COLLECTIVES), and a rank's engine (``RankEngine``) runs the graph piece by piece:
every op goes to the first piece whose inputs exist by then, a collective's output exists from the piece after
the one that computes its input, and each piece hands on what later pieces read. Nothing is computed twice.

``RankPool`` starts the ranks (torch.multiprocessing, spawn), joins them into one gloo process group and runs
tasks on all of them at once; each returns what its engine emitted.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import queue
import signal
import socket
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from onnx import helper

from . import onnx_fp16
from .lowering import COLLECTIVES


@dataclass
class Piece:
    """A part of a rank's graph between collectives, and the collectives that run on its outputs."""

    model: onnx.ModelProto
    inputs: list[str]
    outputs: list[str]
    collectives: list[onnx.NodeProto]


def has_collectives(model: onnx.ModelProto) -> bool:
    return any(node.domain == COLLECTIVES for node in model.graph.node)


def cut_at_collectives(model: onnx.ModelProto) -> list[Piece]:
    """``model`` (nodes in topological order, as the lowering emits them) as pieces between its collectives."""
    graph = model.graph
    level: dict[str, int] = {value.name: 0 for value in [*graph.input, *graph.initializer]}
    assigned: list[list[onnx.NodeProto]] = []
    collectives: list[list[onnx.NodeProto]] = []
    for node in graph.node:
        at = max((level[name] for name in node.input if name), default=0)
        while len(assigned) <= at + 1:
            assigned.append([])
            collectives.append([])
        if node.domain == COLLECTIVES:
            collectives[at].append(node)  # runs after piece ``at``; its output exists from the next one
            level.update((name, at + 1) for name in node.output)
        else:
            assigned[at].append(node)
            level.update((name, at) for name in node.output)
    while assigned and not assigned[-1] and not collectives[-1]:
        assigned.pop()
        collectives.pop()
    types = onnx_fp16.value_types(model)
    graph_outputs = [output.name for output in graph.output]
    initializers = {init.name: init for init in graph.initializer}
    pieces = []
    for k, nodes in enumerate(assigned):
        produced = {name for node in nodes for name in node.output}
        read_later = {name for later in assigned[k + 1:] for node in later for name in node.input}
        read_later |= {node.input[0] for node in collectives[k]}
        outputs = [name for node in nodes for name in node.output if name in read_later or name in graph_outputs]
        inputs = list(dict.fromkeys(name for node in nodes for name in node.input
                                    if name and name not in produced and name not in initializers))
        piece_graph = helper.make_graph(
            nodes, f"{graph.name}_piece{k}",
            [helper.make_tensor_value_info(name, types[name], None) for name in inputs],
            [helper.make_tensor_value_info(name, types[name], None) for name in outputs],
            [initializers[name] for name in dict.fromkeys(n for node in nodes for n in node.input)
             if name in initializers])
        opsets = [opset for opset in model.opset_import if opset.domain != COLLECTIVES]
        pieces.append(Piece(helper.make_model(piece_graph, opset_imports=opsets), inputs, outputs, collectives[k]))
    return pieces


def run_collective(node: onnx.NodeProto, array: np.ndarray) -> np.ndarray:
    """The collective ``node`` on this rank's ``array``, over the process group (its group: every rank)."""
    attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if list(attributes["group"]) != list(range(dist.get_world_size())):
        raise NotImplementedError(f"{node.op_type}: group {list(attributes['group'])} is not the whole world")
    # A copy (all_reduce sums in place, and the input may be read again), on the rank's GPU where NCCL runs it.
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    tensor = torch.from_numpy(np.array(array)).to(device)
    if node.op_type == "AllReduce":
        dist.all_reduce(tensor)  # sums, as TensorRT-LLM's AllReduce plugin
        return tensor.cpu().numpy()
    gathered = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, tensor)
    return np.concatenate([t.cpu().numpy() for t in gathered], axis=attributes["gather_dim"])


class RankEngine:
    """A rank's engine: its pieces in ONNX Runtime sessions, the collectives between them."""

    backend = "onnx"
    refittable = False

    def __init__(self, pieces: list[Piece], weights: dict[str, np.ndarray], outputs: list[str],
                 session: Callable[[onnx.ModelProto], object]):
        self.pieces, self.weights, self.outputs = pieces, weights, outputs
        # A piece may hold no op (two collectives in a row): nothing to run there.
        self.sessions = [session(piece.model) if piece.model.graph.node else None for piece in pieces]

    def infer(self, feed: dict[str, np.ndarray]) -> OrderedDict[str, np.ndarray]:
        values = {**feed, **self.weights}
        for piece, session in zip(self.pieces, self.sessions):
            if session is not None:
                arrays = session.run(piece.outputs, {name: values[name] for name in piece.inputs})
                values.update(zip(piece.outputs, arrays))
            for node in piece.collectives:
                values[node.output[0]] = run_collective(node, values[node.input[0]])
        return OrderedDict((name, values[name]) for name in self.outputs)


# ---------------------------------------------------------------- the rank processes

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def collectives_backend(tp_size: int) -> str:
    """NCCL where every rank can have a GPU of its own, else gloo."""
    return "nccl" if torch.cuda.is_available() and torch.cuda.device_count() >= tp_size else "gloo"


INIT_TIMEOUT_S = 120  # 8 ranks form their group in a few seconds on 2 cores


def _next_task(tasks):
    """The next task, or None once the pool stops or its process is gone (killed: nobody would send None)."""
    while True:
        try:
            return tasks.get(timeout=1)
        except queue.Empty:
            if not mp.parent_process().is_alive():
                return None


def _rank_main(rank: int, world: int, port: int, backend: str, tasks, results) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: the pool stops the ranks
    torch.set_num_threads(1)  # the ranks share this machine's cores
    if backend == "nccl":
        torch.cuda.set_device(rank)
    # A bounded wait for the others: a rank whose pool was killed while the group formed must not wait 30 minutes.
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=INIT_TIMEOUT_S))
    try:
        while (task := _next_task(tasks)) is not None:
            function, args = task
            try:
                results.put((rank, function(rank, *args), None))
            except Exception as e:  # reported by the pool; a rank that fails still takes part in the next task
                results.put((rank, None, f"{type(e).__name__}: {e}".splitlines()[0]))
    finally:
        dist.destroy_process_group()


@contextlib.contextmanager
def _sigint_held():
    """Ctrl-C held back inside, raised on the way out (Python runs its signal handlers in the main thread, whichever
    thread the signal reached)."""
    interrupted = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: interrupted.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if interrupted:
        raise KeyboardInterrupt


class RankError(RuntimeError):
    """A rank's task raised: ``rank`` and its one-line reason."""

    def __init__(self, rank: int, reason: str):
        super().__init__(f"rank {rank}: {reason}")
        self.rank, self.reason = rank, reason


class RankPool(contextlib.AbstractContextManager):
    """``tp_size`` rank processes in one process group (collectives_backend); ``run(function, args_of_rank)`` calls
    ``function(rank, *args_of_rank(rank))`` on every rank at once and returns the results in rank order.
    ``function`` must be importable (the rank processes unpickle it by name)."""

    def __init__(self, tp_size: int):
        self.tp_size, self.backend = tp_size, collectives_backend(tp_size)
        # forkserver: one server process imports torch, ONNX Runtime and the port once, and each rank is forked
        # from it (spawn imports them again in every rank: 7 s for 8 ranks on 2 cores, against 2 s); nothing is
        # forked from a process that has run torch's or ONNX Runtime's thread pools.
        context = mp.get_context("forkserver")
        context.set_forkserver_preload(["trt_layers._forkserver", "trt_layers.ranks", "trt_layers.network"])
        self.tasks = [context.Queue() for _ in range(tp_size)]
        self.results = context.Queue()
        port = _free_port()
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        self.processes = [context.Process(target=_rank_main, args=(rank, tp_size, port, self.backend,
                                                                    self.tasks[rank], self.results), daemon=True)
                          for rank in range(tp_size)]
        try:
            with _sigint_held():  # a rank interrupted half-started would be beyond reach (the pool has no pid)
                for process in self.processes:
                    process.start()
        except BaseException:  # Ctrl-C, held back until every rank started: none may outlive this process
            self._kill()
            raise

    def run(self, function: Callable, args_of_rank: Callable[[int], tuple]) -> list:
        for rank, tasks in enumerate(self.tasks):
            tasks.put((function, args_of_rank(rank)))
        outcomes = {}
        while len(outcomes) < self.tp_size:
            try:
                rank, value, error = self.results.get(timeout=1)
            except queue.Empty:  # a rank that died (killed, out of memory) never answers
                if dead := [r for r, p in enumerate(self.processes) if not p.is_alive() and r not in outcomes]:
                    raise RankError(dead[0], f"its process exited (code {self.processes[dead[0]].exitcode})")
                continue
            outcomes[rank] = (value, error)
        for rank in range(self.tp_size):
            if outcomes[rank][1] is not None:
                raise RankError(rank, outcomes[rank][1])
        return [outcomes[rank][0] for rank in range(self.tp_size)]

    def __exit__(self, exc_type, *exc) -> None:
        """Stop the ranks: after their last task, or (an exception on its way, Ctrl-C) at once."""
        if exc_type is not None:
            self._kill()
            return
        for tasks in self.tasks:
            tasks.put(None)
        for process in self.processes:
            process.join(timeout=30)
        self._kill()

    def _kill(self) -> None:
        """Every rank at once, rank 0 (which serves the group's store) last: a rank that outlived it would report
        the lost connection."""
        started = [process for process in self.processes if process.pid is not None]
        for process in reversed(started):
            process.kill()
        for process in started:
            process.join()

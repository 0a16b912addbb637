"""Small pieces that graph rewrites share: who reads each tensor, dropping dead nodes, reading intermediate
tensors with onnxruntime, and writing a rewritten graph the way its source was written."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def attribute(node: Any, name: str, default: Any = None) -> Any:
    """The value of a node's attribute (ints as a list), `default` where the node does not set it."""
    from onnx import AttributeProto, helper

    found = next((a for a in node.attribute if a.name == name), None)
    if found is None or found.type == AttributeProto.UNDEFINED:
        return default
    return helper.get_attribute_value(found)


def readers(model: Any) -> dict[str, list[Any]]:
    """Tensor name -> the nodes of the main graph that read it."""
    found: dict[str, list[Any]] = {}
    for node in model.graph.node:
        for name in node.input:
            found.setdefault(name, []).append(node)
    return found


def constants(model: Any) -> dict[str, Any]:
    """Tensor name -> TensorProto of the main graph's initializers and Constant nodes (their `value`)."""
    found = {i.name: i for i in model.graph.initializer}
    found.update({n.output[0]: a.t for n in model.graph.node if n.op_type == "Constant"
                  for a in n.attribute if a.name == "value"})
    return found


def drop_dead(model: Any) -> None:
    """Remove nodes none of whose outputs reach the graph's outputs; a graph with subgraphs (If, Loop, Scan), whose
    bodies can read any outer tensor, is left as it is."""
    if any(a.type in (5, 10) for n in model.graph.node for a in n.attribute):  # GRAPH, GRAPHS
        return
    needed = {o.name for o in model.graph.output}
    alive = []
    for node in reversed(model.graph.node):
        if any(o in needed for o in node.output):
            alive.append(node)
            needed.update(node.input)
    del model.graph.node[:]
    model.graph.node.extend(reversed(alive))


def read_anywhere(graph: Any) -> set[str]:
    """The tensors any node reads, in the graph and in the bodies of its If, Loop and Scan nodes."""
    names: set[str] = set()
    for node in graph.node:
        names.update(node.input)
        for attribute in node.attribute:
            for body in [attribute.g] if attribute.type == 5 else list(attribute.graphs):  # GRAPH, GRAPHS
                names |= read_anywhere(body)
    return names


def drop_unread(model: Any, names: set[str]) -> None:
    """Drop the dead nodes (`drop_dead`), then those of the initializers `names` that no node reads any more."""
    drop_dead(model)
    read = read_anywhere(model.graph)
    kept = [i for i in model.graph.initializer if i.name not in names or i.name in read]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)


def probe_session(model: Any, names: list[str], weights_dir: Path | None = None) -> Any:
    """An onnxruntime CPU session whose outputs are the named float tensors of `model` (only the nodes they need
    kept, no graph optimization, so every tensor keeps its name); `weights_dir`: where its external weights lie."""
    import onnx
    import onnxruntime as ort
    from onnx import helper

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    del probe.graph.output[:]
    probe.graph.output.extend(helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in names)
    drop_dead(probe)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if weights_dir is not None:
        so.add_session_config_entry("session.model_external_initializers_file_folder_path", str(weights_dir))
    return ort.InferenceSession(probe.SerializeToString(), so, providers=["CPUExecutionProvider"])


def save_like(model: Any, src: Path, dst: Path) -> None:
    """Write `model` to `dst` as `src` was written: weights in an external `.data` file when src had one."""
    import onnx

    external = src.with_name(src.name + ".data").exists()
    dst.with_name(dst.name + ".data").unlink(missing_ok=True)
    onnx.save(model, str(dst), save_as_external_data=external, all_tensors_to_one_file=True,
              location=dst.name + ".data" if external else None)

"""Any PyTorch architecture: a model class from the user's own file (``--model-def FILE.py:NAME``),
the Linear layer to defend, and the cut of the network at that layer.

``--model-def`` **runs the code in FILE.py** (as ``trust_remote_code`` does elsewhere): pass only
files you trust. NAME is an ``nn.Module`` class or a function returning one; it is called with no
arguments, or with ``num_classes=N`` when it takes that parameter.

FLAIN needs the network cut at the defended layer: a prefix that maps images to the layer's
inputs (run once on the aux set) and a head that maps the layer's outputs to logits (re-run for
every candidate weight). Built-in models are :class:`~flain_cli.models.LayerStack`\\ s and cut by
position; any other model is traced with ``torch.fx`` and cut in its graph. A head that also reads
values bypassing the layer (a skip connection around it) cannot be cut there: that is an error.
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import sys
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import fx, nn

from .errors import ConfigError, opt
from .files import regular_file
from .models import LayerStack


def parse_model_def(spec: str) -> tuple[Path, str]:
    """``FILE.py:NAME`` -> (path, name)."""
    path, sep, name = spec.rpartition(":")
    if not sep or not path or not name.isidentifier():
        raise ConfigError(f"{spec!r} must be FILE.py:NAME, e.g. models.py:Net", param="model_def")
    return Path(path), name


def model_def_file(spec: str | None) -> Path | None:
    """The file of a ``--model-def`` spec, or None without one."""
    return parse_model_def(spec)[0] if spec else None


def model_def_record(spec: str) -> dict[str, str]:
    """What the metadata keeps of a model definition: the spec as given and the file's sha256."""
    path, _ = parse_model_def(spec)
    return {"spec": spec, "sha256": hashlib.sha256(regular_file(path, opt("model_def")).read_bytes()).hexdigest()}


def build_from_def(spec: str, num_classes: int | None) -> nn.Module:
    """Run FILE.py and build NAME (see the module's docstring)."""
    path, name = parse_model_def(spec)
    regular_file(path, opt("model_def"))
    module_name = f"flain_model_def_{hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]}"
    if module_name not in sys.modules:
        loader = importlib.util.spec_from_file_location(module_name, path)
        if loader is None or loader.loader is None:
            raise ConfigError(f"{path} cannot be imported as Python", param="model_def")
        module = importlib.util.module_from_spec(loader)
        try:
            loader.loader.exec_module(module)
        except Exception as exc:  # noqa: BLE001 - the user's code: report its failure in one line
            raise ConfigError(f"{path} failed while running: {type(exc).__name__}: {exc}", param="model_def") from None
        sys.modules[module_name] = module
    factory = getattr(sys.modules[module_name], name, None)
    if factory is None or not callable(factory):
        raise ConfigError(f"{path} has no class or function {name!r}", param="model_def")
    params: Mapping[str, inspect.Parameter]
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        params = {}
    kwargs = {"num_classes": num_classes} if "num_classes" in params and num_classes is not None else {}
    try:
        model = factory(**kwargs)
    except Exception as exc:  # noqa: BLE001
        raise ConfigError(f"{spec}: {name}({', '.join(f'{k}={v}' for k, v in kwargs.items())}) failed: "
                          f"{type(exc).__name__}: {exc}; NAME must build the model without other arguments",
                          param="model_def") from None
    if not isinstance(model, nn.Module):
        raise ConfigError(f"{spec}: {name}() returned a {type(model).__name__}, not a torch nn.Module",
                          param="model_def")
    return model


def linear_layers(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]


def get_linear(model: nn.Module, layer: str) -> nn.Linear:
    """The Linear layer named ``layer`` (a qualified name such as ``fc`` or ``classifier.1``)."""
    module = dict(model.named_modules()).get(layer)
    if not isinstance(module, nn.Linear):
        what = "is not in this model" if module is None else f"is a {type(module).__name__}, not a Linear layer"
        raise ConfigError(f"layer {layer!r} {what}; Linear layers: {', '.join(linear_layers(model)) or 'none'}")
    return module


@torch.no_grad()
def first_linear(model: nn.Module, input_shape: tuple[int, ...]) -> str:
    """The first nn.Linear that a forward pass reaches (a probe on a zero batch, with hooks)."""
    order: list[str] = []
    hooks = [module.register_forward_hook(lambda m, i, o, name=name: order.append(name))
             for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    was_training = model.training
    try:
        model.eval()(torch.zeros(2, *input_shape, device=next(model.parameters()).device))
    except Exception as exc:  # noqa: BLE001
        raise ConfigError(f"the model does not run on {list(input_shape)} inputs ({type(exc).__name__}: {exc}); "
                          f"check {opt('dataset')} or the input size") from None
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    if not order:
        raise ConfigError("the model's forward pass reaches no nn.Linear layer; FLAIN defends a Linear layer")
    return order[0]


def split_model(model: nn.Module, layer: str) -> tuple[nn.Module, nn.Module]:
    """(prefix, head): prefix maps inputs to ``layer``'s input, head maps its output to the logits.

    Both share the model's modules; the head's parameters keep the model's names (``fc2.weight``).
    """
    if isinstance(model, LayerStack):
        i = model.index_of(layer)
        return model[:i], model[i + 1:]
    get_linear(model, layer)
    try:
        graph = fx.symbolic_trace(model).graph
    except Exception as exc:  # noqa: BLE001 - fx cannot follow data-dependent Python control flow
        raise ConfigError(f"cannot trace the model with torch.fx to cut it at {layer} ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0] if str(exc) else ''}); a forward() without data-dependent "
                          "branches is needed") from None
    calls = [n for n in graph.nodes if n.op == "call_module" and n.target == layer]
    if len(calls) != 1:
        raise ConfigError(f"layer {layer} is called {len(calls)} times in the forward pass; FLAIN needs it once")
    node = calls[0]
    if len(node.args) != 1 or node.kwargs or not isinstance(node.args[0], fx.Node):
        raise ConfigError(f"layer {layer} is called with other than one input")
    return fx.GraphModule(model, _prefix_graph(graph, node.args[0])), fx.GraphModule(model, _head_graph(graph, node))


def _prefix_graph(graph: fx.Graph, feature: fx.Node) -> fx.Graph:
    """The nodes that compute ``feature`` from the inputs."""
    needed: set[fx.Node] = set()
    stack = [feature]
    while stack:
        n = stack.pop()
        if n not in needed:
            needed.add(n)
            stack.extend(n.all_input_nodes)
    out, env = fx.Graph(), dict[fx.Node, fx.Node]()
    for n in graph.nodes:
        if n in needed or n.op == "placeholder":
            env[n] = out.node_copy(n, lambda x: env[x])
    out.output(env[feature])
    return out


def _head_graph(graph: fx.Graph, layer_node: fx.Node) -> fx.Graph:
    """The nodes after ``layer_node``, fed its output; refused if they read anything else computed before it."""
    after: set[fx.Node] = {layer_node}
    for n in graph.nodes:
        if n is not layer_node and any(a in after for a in n.all_input_nodes):
            after.add(n)
    out, env = fx.Graph(), {}
    env[layer_node] = out.placeholder("pre")
    output = next(n for n in graph.nodes if n.op == "output")
    for n in graph.nodes:
        if n in after and n is not layer_node:
            bypass = [a for a in n.all_input_nodes if a not in after and a.op not in ("get_attr",)]
            if bypass:
                raise ConfigError(f"after {layer_node.target} the network also reads {bypass[0].name}, computed "
                                  f"before it (a skip connection around it): it cannot be cut at that layer")
            env[n] = out.node_copy(n, lambda x: env[x])
        elif n.op == "get_attr" and any(u in after for u in n.users):
            env[n] = out.node_copy(n)
    if not output.all_input_nodes or not all(a in after for a in output.all_input_nodes):
        raise ConfigError(f"the model's output is not computed from {layer_node.target} alone; it cannot be cut there")
    out.output(fx.map_arg(output.args[0], lambda x: env[x]))
    return out

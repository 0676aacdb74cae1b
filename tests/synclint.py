"""A lint for host synchronisation: calls that make the host wait for the device (or copy to it) when
a tensor lives on a GPU. CUDA's sync debug mode cannot run on a CPU, so CI reads the source instead."""
import ast
import inspect
import textwrap

import torch

# method names and builtins that wait for the device
SYNC_METHODS = {"item", "tolist", "nonzero", "numpy", "cpu", "any", "all", "unique", "masked_select", "argwhere",
                "nonzero_static", "equal", "allclose", "__bool__", "__int__", "__float__"}
SYNC_BUILTINS = {"int", "float", "bool"}
SYNC_TORCH = {"unique", "nonzero", "masked_select", "argwhere", "equal", "allclose", "unique_consecutive"}


def _tree(fn):
    return ast.parse(textwrap.dedent(inspect.getsource(fn)))


def _is_print_branch(node):
    """`if i % args.print_freq == 0:` and the like: the interval at which reading the sums is allowed."""
    return isinstance(node, ast.If) and "print_freq" in ast.unparse(node.test)


def _calls(nodes, skip_print_branches):
    bad, todo = [], list(nodes)
    while todo:
        node = todo.pop()
        if skip_print_branches and _is_print_branch(node):
            todo.extend(node.orelse)
            continue
        if isinstance(node, ast.Call):
            f = node.func
            if isinstance(f, ast.Attribute) and f.attr in SYNC_METHODS:
                if not (isinstance(f.value, ast.Name) and f.value.id == "torch") or f.attr in SYNC_TORCH:
                    bad.append(f".{f.attr}()")
            elif isinstance(f, ast.Name) and f.id in SYNC_BUILTINS:
                bad.append(f"{f.id}()")
        elif isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Compare):
            bad.append("boolean-mask indexing")
        todo.extend(ast.iter_child_nodes(node))
    return sorted(bad)


def sync_calls(fn):
    """Every host-synchronising call anywhere in `fn` (a quantizer's forward/backward: none allowed)."""
    return _calls([_tree(fn)], skip_print_branches=False)


def loop_sync_calls(fn):
    """Host-synchronising calls inside the `for` loops of `fn` (a training or evaluation pass), outside the
    print-interval branches; what runs once before or after the loop is not counted."""
    loops = [n for n in ast.walk(_tree(fn)) if isinstance(n, ast.For)]
    return _calls([s for loop in loops for s in loop.body], skip_print_branches=True)


def hot_functions(*modules, skip=()):
    """(name, function) of every autograd Function's forward/backward, nn.Module forward and module-level
    function defined in `modules` (the quantizer code a forward or backward runs)."""
    out = []
    for mod in modules:
        for name, obj in vars(mod).items():
            if name in skip:
                continue
            if inspect.isclass(obj) and obj.__module__ == mod.__name__:
                if issubclass(obj, torch.autograd.Function):
                    out += [(f"{name}.forward", obj.forward), (f"{name}.backward", obj.backward)]
                elif issubclass(obj, torch.nn.Module) and "forward" in vars(obj):
                    out.append((f"{name}.forward", obj.forward))
            elif inspect.isfunction(obj) and obj.__module__ == mod.__name__:
                out.append((name, obj))
    return out

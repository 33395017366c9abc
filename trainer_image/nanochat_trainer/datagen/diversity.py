"""How varied a set of documents is: the figures the generate stage reports.

    from nanochat_trainer.datagen.diversity import diversity
    diversity(texts)
    # {"documents": 500, "with_code": 500, "distinct_skeletons": 0.31,
    #  "distinct_identifiers": 812, "near_duplicate_rate": 0.02}

- documents: how many texts;
- with_code: how many have code whose skeleton can be taken: the text itself when it parses as
  Python, else its ```python blocks that parse (joined, in order); the others are skipped by
  the next two figures;
- distinct_skeletons: distinct skeletons / with_code, i.e. the share of those documents whose
  skeleton no earlier document had (1.0: all different). A skeleton is the `ast.dump` of the code
  with every name the author chose (variables, parameters, functions, classes, import aliases)
  made "_", every constant made None and every docstring removed: what is left is the shape of
  the program, the attributes and keywords of the libraries it calls included;
- distinct_identifiers: how many different names the documents define (functions, classes,
  parameters, assigned and loop variables), over all of them;
- near_duplicate_rate: the share of documents that `dedup.Deduper` (threshold 0.8) flags, exact
  copies included, against the documents before them.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable

from .dedup import PYTHON_FENCE, Deduper, defined_in


def diversity(texts: Iterable[str]) -> dict[str, float]:
    skeletons: set[str] = set()
    identifiers: set[str] = set()
    dedup = Deduper(threshold=0.8)
    documents = with_code = flagged = 0
    for text in texts:
        tree = code_tree(text)
        if tree is not None:
            with_code += 1
            identifiers |= defined_in(tree)
            skeletons.add(skeleton(tree))
        flagged += dedup.check_and_add(str(documents), text) is not None
        documents += 1
    return {
        "documents": documents,
        "with_code": with_code,
        "distinct_skeletons": len(skeletons) / with_code if with_code else 0.0,
        "distinct_identifiers": len(identifiers),
        "near_duplicate_rate": flagged / documents if documents else 0.0,
    }


def code_tree(text: str) -> ast.Module | None:
    """The text as Python, else its ```python blocks that parse, joined; None without code."""
    tree = _parse(text)
    if tree is not None:
        return tree
    blocks = [t for t in map(_parse, PYTHON_FENCE.findall(text)) if t is not None]
    return ast.Module(body=[s for t in blocks for s in t.body], type_ignores=[]) if blocks else None


def skeleton(tree: ast.Module) -> str:
    """The shape of the code: names the author chose, constants and docstrings normalised away
    (in place: copying a large tree would cost more than parsing it again)."""
    return ast.dump(_Skeleton().visit(tree), annotate_fields=False)


class _Skeleton(ast.NodeTransformer):
    def generic_visit(self, node: ast.AST) -> ast.AST:
        body = getattr(node, "body", None)
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and body:
            if isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                if isinstance(body[0].value.value, str):
                    node.body = body[1:] or [ast.Pass()]  # the docstring
        return super().generic_visit(node)

    def visit_Name(self, node: ast.Name) -> ast.AST:
        return ast.Name(id="_", ctx=node.ctx)

    def visit_arg(self, node: ast.arg) -> ast.AST:
        node.arg = "_"
        return self.generic_visit(node)

    def visit_Constant(self, node: ast.Constant) -> ast.AST:
        return ast.Constant(value=None)

    def visit_FunctionDef(self, node: ast.FunctionDef) -> ast.AST:
        node.name = "_"
        return self.generic_visit(node)

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_ClassDef(self, node: ast.ClassDef) -> ast.AST:
        node.name = "_"
        return self.generic_visit(node)

    def visit_alias(self, node: ast.alias) -> ast.AST:
        node.asname = "_" if node.asname else None
        return node


def _parse(code: str) -> ast.Module | None:
    try:
        return ast.parse(code)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None

"""docs/configs.md's key table is generated from the comments in ``solo/config.py``.

``add_solo_config`` is the one place where a ``MODEL.SOLO`` key, its default and its meaning are
written down; the table in docs/configs.md is rendered from it (the comment block above each
assignment, the default read from a built config) and these tests fail when the two drift.
Regenerate the table with::

    .venv/bin/python tests/test_config_docs.py
"""

import inspect
import os
import re

from detectron2.config import CfgNode, get_cfg

from solo.config import add_solo_config

DOC_PATH = os.path.join(os.path.dirname(__file__), os.pardir, "docs", "configs.md")
BEGIN = "<!-- BEGIN key table: generated from projects/SOLO/solo/config.py by tests/test_config_docs.py -->"  # noqa: E501
END = "<!-- END key table -->"
_ASSIGNMENT = re.compile(r"^(_C|cfg)\.([A-Z0-9_.]+)\s*=\s*(.*)$")


def config_key_groups(source=None):
    """``[(keys, meaning)]`` in the order of ``source`` (default: ``add_solo_config``'s code).

    A key's meaning is the comment block directly above its assignment; keys assigned right
    after another key, without a comment of their own, share that key's row (e.g. the focal-loss
    parameters). A new node (``= CN()``) passes its comment on to the first key below it. Keys
    are full names: ``_C.X`` is ``MODEL.SOLO.X``, ``cfg.A.B`` is ``A.B``.
    """
    groups, comment, previous_was_key = [], [], False
    source = inspect.getsource(add_solo_config) if source is None else source
    for line in source.splitlines():
        text = line.strip()
        match = _ASSIGNMENT.match(text)
        if text.startswith("#"):
            comment.append(text.lstrip("#").strip())
            previous_was_key = False
        elif match and match.group(3) == "CN()":
            continue
        elif match:
            key = ("MODEL.SOLO." if match.group(1) == "_C" else "") + match.group(2)
            if comment or not previous_was_key:
                groups.append(([key], " ".join(comment)))
            else:
                groups[-1][0].append(key)
            comment, previous_was_key = [], True
        else:
            comment, previous_was_key = [], False
    return groups


def _default(cfg, key):
    value = cfg
    for part in key.split("."):
        value = value[part]
    if isinstance(value, str):
        return f'"{value}"'
    return str(list(value) if isinstance(value, tuple) else value)


def render_key_table():
    """The Markdown table between the BEGIN/END markers of docs/configs.md."""
    cfg = get_cfg()
    add_solo_config(cfg)
    rows = ["| key | default | meaning (comment in `solo/config.py`) |", "|---|---|---|"]
    for keys, meaning in config_key_groups():
        names = ", ".join(f"`{key}`" for key in keys)
        defaults = ", ".join(f"`{_default(cfg, key)}`" for key in keys)
        rows.append(f"| {names} | {defaults} | {meaning.replace('|', '&#124;')} |")
    return "\n".join(rows)


def _documented_table():
    with open(DOC_PATH, encoding="utf-8") as f:
        text = f.read()
    assert BEGIN in text and END in text, f"{DOC_PATH} lost its {BEGIN!r} / {END!r} markers"
    return text, text.split(BEGIN, 1)[1].split(END, 1)[0].strip()


def test_docs_configs_table_equals_the_comments_in_config_py():
    _, documented = _documented_table()
    assert documented == render_key_table(), (
        "docs/configs.md's key table differs from projects/SOLO/solo/config.py: regenerate it "
        "with `.venv/bin/python tests/test_config_docs.py`."
    )


def _leaf_keys(node, prefix=""):
    for name, value in node.items():
        if isinstance(value, CfgNode):
            yield from _leaf_keys(value, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}"


def test_every_key_add_solo_config_adds_has_a_commented_row():
    cfg = get_cfg()
    before = set(_leaf_keys(cfg))
    add_solo_config(cfg)
    groups = config_key_groups()
    listed = sorted(key for keys, _ in groups for key in keys)
    assert listed == sorted(set(_leaf_keys(cfg)) - before)
    assert all(meaning for _, meaning in groups), [keys for keys, m in groups if not m]


def test_parser_joins_uncommented_keys_to_the_row_above_and_resets_at_blank_lines():
    source = """
    # Heading.
    # Meaning of A.
    _C.A = 1
    _C.B = 2

    _C.C = 3
    x = 4
    # Solver key.
    cfg.SOLVER.D = "SGD"
    # A new node; its comment goes to its first key.
    cfg.MODEL.NEW = CN()
    cfg.MODEL.NEW.E = []
    """
    assert config_key_groups(source) == [
        (["MODEL.SOLO.A", "MODEL.SOLO.B"], "Heading. Meaning of A."),
        (["MODEL.SOLO.C"], ""),
        (["SOLVER.D"], "Solver key."),
        (["MODEL.NEW.E"], "A new node; its comment goes to its first key."),
    ]


if __name__ == "__main__":
    text, _ = _documented_table()
    head, rest = text.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    with open(DOC_PATH, "w", encoding="utf-8") as f:
        f.write(f"{head}{BEGIN}\n\n{render_key_table()}\n\n{END}{tail}")
    print(f"wrote the key table of {os.path.normpath(DOC_PATH)}")

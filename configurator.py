"""The one config mechanism every llamaforge script uses.

A script keeps its settings as plain module globals with defaults, then calls
    configure(globals(), sys.argv[1:])
which applies, in order: an optional Python config file (the first argument not starting with --),
then --key=value flags. Values are parsed as Python literals (--lr=3e-4, --compile=True,
--prompt="Once upon"); a value that is not a literal is taken as a string. Every key must already
exist with a default, and the new value must have the default's type, so a typo is an error that
names the nearest valid keys instead of a silently ignored setting.
"""
import ast
import os
import sys

from runtime import HelpRequested, UsageError


def config_keys(namespace):
    """The names a script exposes as config: public globals holding plain values."""
    return [k for k, v in namespace.items()
            if not k.startswith("_") and not k.isupper()  # UPPER_CASE names are constants, not settings
            and isinstance(v, (bool, int, float, str, tuple, list, type(None)))]


def _check(key, value, namespace, keys, source):
    if key not in keys:
        import difflib  # a mistake's hint only
        near = difflib.get_close_matches(key, keys, n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(near)}?" if near else "; see the config keys in the README"
        raise UsageError(f"unknown config key '{key}' in {source}{hint}")
    default = namespace[key]
    if default is None:  # None means "unset / auto": any type may replace it
        return value
    if value is None:
        raise UsageError(f"config key '{key}' in {source} needs a value (default {default!r}), not None")
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif isinstance(default, (tuple, list)):
        if default and not isinstance(value, (tuple, list)) and type(value) is type(default[0]):
            value = (value,)  # --sizes_mb=5000 means the one-value sweep (5000,)
        ok = isinstance(value, (tuple, list))
        value = type(default)(value) if ok else value
    else:
        ok = isinstance(value, type(default))
    if not ok:
        raise UsageError(f"config key '{key}' in {source} expects {type(default).__name__} "
                         f"(default {default!r}), got {type(value).__name__} {value!r}")
    return value


def parse_value(text):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # a bare word such as --device=cuda is a string


def configure(namespace, argv, explicit=None, only=None):
    """Override namespace's config globals from a config file and --key=value flags in argv.
    Returns the dict of config keys and their final values (saved into checkpoints). If given, the set
    `explicit` receives the keys the file or the flags set (train.py's resume keeps the others).
    -h/--help raises HelpRequested with the settings (those in `only`, if given) and their meanings."""
    keys = config_keys(namespace)
    explicit = set() if explicit is None else explicit
    if "-h" in argv or "--help" in argv:
        raise HelpRequested(help_text(namespace, only))
    for arg in argv:
        if not arg.startswith("--"):
            if not arg.endswith(".py"):
                raise UsageError(f"config file '{arg}' is not a .py file; config files are Python (key = value lines), "
                                 f"settings on the command line are --key=value")
            if not os.path.isfile(arg):
                raise UsageError(f"config file '{arg}' not found; pass a path such as config/demo.py "
                                 f"(or settings as --key=value)")
            file_ns = {}
            try:
                with open(arg) as f:
                    exec(compile(f.read(), arg, "exec"), file_ns)
            except Exception as e:  # a config file is Python: report its error in one line
                raise UsageError(f"config file '{arg}' failed: {type(e).__name__}: {e}")
            for key, value in file_ns.items():
                if key.startswith("_") or type(value).__name__ == "module":
                    continue
                namespace[key] = _check(key, value, namespace, keys, arg)
                explicit.add(key)
        else:
            key, sep, text = arg[2:].partition("=")
            if not sep:  # --flag alone switches a boolean on
                if isinstance(namespace.get(key), bool):
                    text = "True"
                else:
                    raise UsageError(f"flag '{arg}' has no value; write --{key}=VALUE")
            key = key.replace("-", "_")
            namespace[key] = _check(key, parse_value(text), namespace, keys, f"flag --{key}")
            explicit.add(key)
    return {k: namespace[k] for k in keys}


def require(config, positive=(), non_negative=(), fraction=()):
    """Refuse values of the right type but impossible meaning, before any work is done: sizes and counts
    that must be > 0 or >= 0, and probabilities outside [0, 1]."""
    for keys, ok, what in ((positive, lambda v: v > 0, "> 0"), (non_negative, lambda v: v >= 0, ">= 0"),
                           (fraction, lambda v: 0 <= v <= 1, "in [0, 1]")):
        for k in keys:
            if not ok(config[k]):
                raise UsageError(f"{k}={config[k]!r} must be {what}")


def print_config(config, file=sys.stdout, only=None):
    """The settings a run uses (`only`: those that matter to a subcommand), one per line."""
    shown = {k: v for k, v in config.items() if only is None or k in only}
    width = max(len(k) for k in shown) if shown else 0
    for k, v in shown.items():
        print(f"  {k:<{width}} = {v!r}", file=file)


def help_text(namespace, only=None):
    """The script's docstring, then each setting with its default and the comment that defines it."""
    path = namespace.get("__file__")
    settings = script_settings(path) if path else {k: (namespace[k], "") for k in config_keys(namespace)}
    shown = {k: d for k, d in settings.items() if only is None or k in only}
    width = max(len(f"{k}={v!r}") for k, (v, _) in shown.items()) if shown else 0
    lines = [(namespace.get("__doc__") or "").strip(), "", "settings (defaults; override with a config.py file, "
             "then --key=value):"]
    lines += [f"  --{f'{k}={v!r}':<{width}}  {meaning}" for k, (v, meaning) in shown.items()]
    return "\n".join(lines)


def script_settings(path):
    """{key: (default, comment)} of a script's config globals, read from its source without running it:
    the one place where a setting's default and meaning are written is the line that defines it. --help
    prints these, and bench.py takes train.py's defaults from here."""
    import io
    import tokenize
    with open(path, encoding="utf-8") as f:
        source = f.read()
    comments = {}  # line number -> (continues the comment above it, text): an indented comment-only line does
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            alone = tok.line[:tok.start[1]].strip() == "" and tok.start[1] > 0
            comments[tok.start[0]] = (alone, tok.string.lstrip("#").strip())
    out = {}
    for node in ast.parse(source).body:  # the settings block ends at the first function or configure() call
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)) or "configure(" in ast.get_source_segment(source, node):
            break
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)):
            continue
        key = node.targets[0].id
        try:
            value = ast.literal_eval(node.value)
        except ValueError:  # a constant (upper case) or a private name may be computed; a setting may not: it
            if key.startswith("_") or key.isupper():  # would vanish from --help and the README check unseen
                continue
            raise UsageError(f"{path}: setting {key} = {ast.get_source_segment(source, node.value)} is not a "
                             f"literal; write its value out (e.g. 268_435_456, not 1 << 28)")
        if key.startswith("_") or key.isupper() or key not in config_keys({key: value}):
            continue
        text, line = [], node.end_lineno
        if line in comments and not comments[line][0]:
            text.append(comments[line][1])
            while line + 1 in comments and comments[line + 1][0] and text:
                line += 1
                text.append(comments[line][1])
        out[key] = (value, " ".join(text))
    return out

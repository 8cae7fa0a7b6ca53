"""Where text comes from: the Hugging Face Hub, local files, the Python standard library; and the readers of
the record files fine-tuning starts from (JSON, JSONL, CSV, 'text@label' lines, TinyStories-Instruct).
Every reader stops on a bad record with its file and line number.
"""
import csv
import glob
import io
import itertools
import json
import os
from pathlib import Path

from runtime import UsageError

LOCAL_LOADERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def stdlib_docs(max_bytes):
    """The running Python's own standard library, one file at a time: real, varied text every machine has."""
    import sysconfig
    root = Path(sysconfig.get_paths()["stdlib"])
    total = 0
    for p in sorted(root.rglob("*.py")):  # sorted: the same corpus on every run
        if "site-packages" in p.parts:
            continue
        try:
            text = p.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if not text.strip():
            continue
        if total + len(text.encode()) > max_bytes:
            break
        total += len(text.encode())
        yield text


def first_bad_json_line(files):
    """datasets' JSON errors do not say where; find the first line json cannot parse."""
    for fname in files:
        if not fname.endswith(".jsonl"):
            continue
        with open(fname, encoding="utf-8", errors="replace") as f:
            for n, line in enumerate(f, 1):
                try:
                    line.strip() and json.loads(line)
                except json.JSONDecodeError as e:
                    return f"{fname} line {n}: {e}"
    return None


def load_texts(source, text_field="text", hf_config="", hf_split="train", txt_split="paragraph"):
    """The documents of a Hub dataset or of local files, one at a time: streamed, so a corpus larger than
    memory passes through. Both go through datasets.load_dataset(streaming=True), so the offline-tested local
    path is the same code users run against the Hub."""
    import datasets
    datasets.disable_progress_bars()
    local = source.endswith(tuple(LOCAL_LOADERS)) or glob.glob(source)
    if local:
        files = sorted(glob.glob(source))
        if not files:
            raise UsageError(f"no files match {source}; check the path (local sources end in "
                             f"{', '.join(LOCAL_LOADERS)})")
        exts = {Path(f).suffix for f in files}
        if len(exts) != 1 or not exts <= set(LOCAL_LOADERS):
            raise UsageError(f"{source} matches files of types {sorted(exts)}; use one type of "
                             f"{', '.join(LOCAL_LOADERS)} per download")
        loader = LOCAL_LOADERS[exts.pop()]
        kwargs = {"sample_by": txt_split} if loader == "text" else {}
        args = (loader,), dict(data_files={hf_split: files}, split=hf_split, streaming=True, **kwargs)
    else:
        loader, args = None, ((source, hf_config or None), dict(split=hf_split, streaming=True))
    try:
        rows = iter(datasets.load_dataset(*args[0], **args[1]))
        first = next(rows, None)
    except Exception as e:
        if local:
            bad = first_bad_json_line(files)
            where = f"{bad}" if bad else f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            raise UsageError(f"could not read {source} ({where}); fix the file (one JSON object per line for .jsonl)")
        msg = str(e).splitlines()[0][:200] if str(e) else ""
        raise UsageError(f"could not load '{source}' from the Hugging Face Hub ({type(e).__name__}: {msg}); "
                         f"check the name and your internet connection, or pass local files with --source=path/*.jsonl")
    if first is None:
        return
    if text_field not in first:
        raise UsageError(f"{source} has no column '{text_field}' (it has {sorted(first)}); "
                         f"pass --text_field=<one of those>")
    try:
        for row in itertools.chain([first], rows):  # a paragraph split at "\n\n" keeps the rest of a longer run
            yield row[text_field].strip("\n") if loader == "text" else row[text_field]
    except Exception as e:  # a bad line further in: datasets raises mid-stream
        if isinstance(e, UsageError) or not local:
            raise
        bad = first_bad_json_line(files)
        raise UsageError(f"could not read {source} ({bad or type(e).__name__}); fix the file (one JSON object per "
                         f"line for .jsonl)")


def jsonl(path, expect="JSON", fix="fix or delete that line", parse=lambda record: record):
    """(line number, parse(record)) for each non-blank line of a JSONL file, read lazily. A line that is not
    JSON, or that parse rejects (ValueError/KeyError/TypeError), stops with its file, line number and fix."""
    n = 0
    try:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                yield from parse_jsonl((line,), path, n, expect, fix, parse)
    except UnicodeDecodeError as e:
        raise UsageError(f"{path} line {n + 1} is not UTF-8 text (byte {e.start} of the line); save the file as UTF-8")


def parse_jsonl(lines, path, first=1, expect="JSON", fix="fix or delete that line", parse=lambda record: record):
    """jsonl() of lines already read, the first being line number first of path (pretokenize's workers parse
    the chunks their parent reads)."""
    for n, line in enumerate(lines, first):
        if line.strip():
            try:
                yield n, parse(json.loads(line))
            except (ValueError, KeyError, TypeError) as e:  # JSONDecodeError is a ValueError
                raise UsageError(f"{path} line {n} is not {expect} ({type(e).__name__}: {str(e)[:120]}); {fix}")


def text_of(record, field):
    """record[field], which must be a string (a number or a list there is a broken record, not a document)."""
    text = record[field]
    if not isinstance(text, str):
        raise TypeError(f"its '{field}' is a JSON {type(text).__name__}, not a string")
    return text


def jsonl_texts(lines, path, first=1, field="text"):
    """The field of each record of lines (see parse_jsonl)."""
    return [t for _, t in parse_jsonl(lines, path, first, f"a JSON object with a '{field}' string",
                                      parse=lambda r: text_of(r, field))]


def read_jsonl_texts(path, field="text"):
    """Yield field of each line of a JSONL file; a bad line stops with its line number."""
    for _, text in jsonl(path, f"a JSON object with a '{field}' string", parse=lambda r: text_of(r, field)):
        yield text


def read_text(path, encoding="auto"):
    if not os.path.isfile(path):
        raise UsageError(f"{path} not found; pass --source=path/to/file (.json, .jsonl, .csv or .txt)")
    raw = Path(path).read_bytes()
    if encoding != "auto":
        try:
            return raw.decode(encoding)
        except LookupError:
            raise UsageError(f"encoding={encoding!r} is not a codec Python knows; pass e.g. utf-8, latin-1 or auto")
        except UnicodeDecodeError as e:
            raise UsageError(f"{path} is not {encoding} text (byte {e.start}); pass its real --encoding or auto")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:  # Financial PhraseBank and other older corpora are latin-1
        return raw.decode("latin-1")


def read_records(path, encoding="auto", text_field="text", label_field="label"):
    """[(line number, record)] of a JSON array, JSONL, CSV (header row) or 'text@label' .txt file (whose two
    parts become the text_field and label_field of the record)."""
    text = read_text(path, encoding)
    if path.endswith(".json"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise UsageError(f"{path} line {e.lineno} is not valid JSON ({e.msg}); fix the file")
        if not isinstance(data, list):
            raise UsageError(f"{path} holds a JSON {type(data).__name__}, not a list of records; use a list or .jsonl")
        return [(n, r) for n, r in enumerate(data, 1)]  # "line" = record number in a JSON array
    if path.endswith(".jsonl"):
        out = []
        for n, line in enumerate(text.split("\n"), 1):  # not splitlines(): it also cuts at \x85, \u2028...
            if line.strip():
                try:
                    out.append((n, json.loads(line)))
                except json.JSONDecodeError as e:
                    raise UsageError(f"{path} line {n} is not valid JSON ({e.msg}); fix or delete that line")
        return out
    if path.endswith(".csv"):
        reader = csv.DictReader(io.StringIO(text, newline=""))
        return [(reader.line_num, r) for r in reader]
    # .txt: Financial PhraseBank's "sentence@label" lines
    return [(n, dict(zip((text_field, label_field), line.rsplit("@", 1))))
            for n, line in enumerate(text.split("\n"), 1) if line.strip()]


def tinystories_entries(text):
    """TinyStories-Instruct text: entries separated by <|endoftext|>, each a few 'Key: value' lines
    (Features, Words, Summary, Random sentence) and a 'Story:' whose paragraphs follow it. The keys come
    in no fixed order, so a key line after the story ends it and is read as metadata."""
    keys = ("Features", "Words", "Summary", "Random sentence")
    entries = []
    for chunk in text.split("<|endoftext|>"):
        entry, story = {}, None  # story: the Story's lines while we are inside it
        for line in chunk.strip().splitlines():
            key, sep, value = line.partition(":")
            if sep and key in keys:
                if story is not None:  # a key line after the story ends it
                    entry["Story"], story = "\n".join(story).strip(), None
                entry[key] = value.strip()
            elif sep and key == "Story":
                story = [value.strip()]
            elif story is not None:
                story.append(line)
        if story is not None:
            entry["Story"] = "\n".join(story).strip()
        if entry.get("Story"):
            entries.append(entry)
    return entries

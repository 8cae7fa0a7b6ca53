"""The one chat template, and the loss mask that comes with it.

A conversation is rendered as token ids, never as a string to be tokenized afterwards:

    BOS <|user|> {user text} <|end_of_turn|> <|assistant|> {answer} <|end_of_turn|> <|user|> ...

Each role marker and <|end_of_turn|> is a single special token of the tokenizer (tokenizer.py adds
them to a trained SentencePiece vocab, the Llama 2 vocab or GPT-2's). Because the ids are appended
message by message, we know exactly which positions hold an answer: the labels are built from the
message boundaries as they are rendered, not by searching the text for "<|assistant|>" afterwards.
The answer's closing <|end_of_turn|> is a label too, so a tuned model learns to stop by itself.
"""
from model import IGNORE_INDEX  # the label of positions the loss skips: the model's own default
from runtime import UsageError
from tokenizer import ASSISTANT, END_OF_TURN, USER


# What render_chat renders, as a Jinja chat template, for tools that render a conversation to text and then
# tokenize it (transformers' apply_chat_template, llama.cpp --jinja): with the specials cut out, each text piece
# encodes on its own, as render_chat encodes each message
JINJA_TEMPLATE = (
    "{{ bos_token }}{% set ns = namespace(system='') %}{% for message in messages %}"
    "{% if message['role'] == 'system' %}{% set ns.system = message['content'] + '\\n\\n' %}"
    "{% elif message['role'] == 'user' %}{{ '" + USER + "' + ns.system + message['content'] + '" + END_OF_TURN + "' }}"
    "{% set ns.system = '' %}"
    "{% elif message['role'] == 'assistant' %}{{ '" + ASSISTANT + "' + message['content'] + '" + END_OF_TURN + "' }}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '" + ASSISTANT + "' }}{% endif %}")


def has_chat_tokens(tok):
    return all(s in getattr(tok, "special_ids", {}) for s in (USER, ASSISTANT, END_OF_TURN))


def chat_ids(tok):
    """(user, assistant, end_of_turn) ids; a clear error if the tokenizer was built without them."""
    missing = [s for s in (USER, ASSISTANT, END_OF_TURN) if s not in tok.special_ids]
    if missing:
        raise UsageError(f"tokenizer {tok.path or tok.kind} has no chat tokens {missing}; re-run "
                         f"python tokenize_data.py train_vocab/pretokenize with --chat_specials=True")
    return tok.special_ids[USER], tok.special_ids[ASSISTANT], tok.special_ids[END_OF_TURN]


def render_chat(tok, messages, add_generation_prompt=False):
    """messages: [{"role": "user"|"assistant"|"system", "content": str}, ...] -> (ids, labels), equal
    lengths; labels[i] is ids[i] where position i is part of an assistant answer (or its end of turn)
    and IGNORE_INDEX elsewhere. A system message is folded into the next user turn (the template has no
    system slot). add_generation_prompt ends the ids with <|assistant|> so a model continues as the
    assistant (for generate.py --chat)."""
    user, assistant, eot = chat_ids(tok)
    ids, labels = [tok.bos_id], [IGNORE_INDEX]
    system = ""
    for i, m in enumerate(messages):
        role, content = m.get("role"), m.get("content")
        if role not in ("user", "assistant", "system") or not isinstance(content, str):
            raise UsageError(f"message {i} needs a role of user/assistant/system and a string content, got {m!r}")
        if role == "system":
            system = content + "\n\n"
            continue
        body = tok.encode(system + content if role == "user" else content)
        system = ""
        if role == "user":
            piece = [user] + body + [eot]
            ids += piece
            labels += [IGNORE_INDEX] * len(piece)
        else:
            ids += [assistant]
            labels += [IGNORE_INDEX]  # the marker is prompt: the model is told to answer, it does not choose to
            ids += body + [eot]
            labels += body + [eot]
    if add_generation_prompt:
        ids.append(assistant)
        labels.append(IGNORE_INDEX)
    return ids, labels


def alpaca_messages(record):
    """An Alpaca record {instruction, input, output} as a two-message conversation."""
    prompt = record["instruction"].strip()
    if record.get("input", "").strip():
        prompt += "\n\n" + record["input"].strip()
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": record["output"].strip()}]


def classification_messages(text, labels, answer=None):
    """The instruction-style prompt used to fine-tune and to score a classifier: the label is the answer."""
    prompt = f"Classify this text as one of: {', '.join(labels)}.\n\n{text.strip()}"
    messages = [{"role": "user", "content": prompt}]
    if answer is not None:
        messages.append({"role": "assistant", "content": answer})
    return messages


# TinyStories-Instruct feature names -> the phrase the prompt uses for them
STORY_FEATURES = {"Dialogue": "the story should contain at least one dialogue",
                  "BadEnding": "the story has a bad ending", "Twist": "something unexpected happens in the story",
                  "Foreshadowing": "the story uses foreshadowing", "MoralValue": "the story has a moral value",
                  "Conflict": "the story has some sort of conflict"}


def story_prompt(words=(), features=()):
    """TinyStories' own prompt style: 'Write a story. In the story, try to use the verb "climb", the noun
    "ring" and the adjective "messy". ... Possible story:'. words are (verb, noun, adjective), as in
    TinyStories-Instruct's 'Words:' line; features are its 'Features:' names."""
    prompt = "Write a story."
    if words:
        kinds = ["the verb", "the noun", "the adjective"] if len(words) == 3 else ["the word"] * len(words)
        used = [f'{k} "{w}"' for k, w in zip(kinds, words)]
        listed = (", ".join(used[:-1]) + " and " if len(used) > 1 else "") + used[-1]
        prompt += f" In the story, try to use {listed}."
    for f in features:
        phrase = STORY_FEATURES.get(f, f"the story has this feature: {f}")
        prompt += f" Remember, {phrase}."
    return prompt + " Possible story:"


def tinystories_messages(entry):
    """A TinyStories-Instruct entry {"Words": "climb, ring, messy", "Features": "Dialogue, Twist", "Story": ...}
    as a conversation: the prompt built from its words and features, the story as the answer."""
    split = lambda key: [w.strip() for w in entry.get(key, "").split(",") if w.strip()]  # noqa: E731
    return [{"role": "user", "content": story_prompt(split("Words"), split("Features"))},
            {"role": "assistant", "content": entry["Story"].strip()}]


def show_example(tok, ids, labels):
    """A debug view: one line per token with its id, its text and whether the loss sees it."""
    lines = [f"{'pos':>4} {'id':>6}  {'trained':<7} token"]
    for pos, (i, lab) in enumerate(zip(ids, labels)):
        piece = tok.id_to_special.get(i) or tok.decode([i]) or ("<bos>" if i == tok.bos_id else "")
        lines.append(f"{pos:>4} {i:>6}  {'yes' if lab != IGNORE_INDEX else '-':<7} {piece!r}")
    return "\n".join(lines)

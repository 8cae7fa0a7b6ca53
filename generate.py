"""Sample text from a trained model, streaming tokens as they are produced.

    python generate.py --checkpoint=out/ckpt.pt --prompt="Once upon a time" --temperature=0.8 --top_k=200
"""
import sys

checkpoint = "out/ckpt.pt"      # our ckpt.pt (or its run directory), a llama2.c .bin, or a Hugging Face folder
prompt = ""                     # text to continue; empty starts from BOS alone
prompt_file = ""                # read the prompt from this file instead
num_samples = 1                 # independent samples to draw
max_new_tokens = 256            # stop after this many new tokens (or at end of sequence, or the context's end)
temperature = 0.8               # 0 = greedy (argmax); higher = more random
top_k = 200                     # sample only from the k most likely tokens; 0 disables
top_p = 1.0                     # nucleus sampling: the smallest set of tokens with this much probability; 1.0 disables
seed = 1337
device = "auto"                 # 'auto', 'cpu', 'cuda', ...
dtype = "auto"                  # 'auto' (bf16 on CUDA where supported, fp32 otherwise), 'float32', 'bfloat16', 'float16'
tokenizer = ""                  # override the checkpoint's tokenizer: a SentencePiece .model, 'gpt2', or a llama2.c tokenizer .bin
stream = True                   # print tokens as they come
chat = False                    # wrap --prompt in the chat template (chat.py) and stop at <|end_of_turn|>
interactive = False             # chat turn by turn: one user message per stdin line; old turns drop out when the context fills
adapter = ""                    # a LoRA run's ckpt.pt to apply on top of --checkpoint (its base); see lora.py
# -----------------------------------------------------------------------------
from configurator import configure  # noqa: E402
configure(globals(), sys.argv[1:])
# -----------------------------------------------------------------------------

import torch  # noqa: E402

from checkpoint import load_model, tokenizer_for  # noqa: E402
from model import check_sampling, inference_device  # noqa: E402


def fail(msg):
    raise SystemExit(f"error: {msg}")


class StreamPrinter:
    """Prints the text of a growing token list as it grows. Decoding the whole list each time (rather
    than token by token) keeps SentencePiece's leading spaces and multi-byte characters right; a
    trailing U+FFFD means a character's bytes are still incomplete, so it waits for the next token."""
    def __init__(self, tok, prompt_ids, out=sys.stdout):
        # start from the prompt so the first new token's leading space is decoded in context
        self.tok, self.out, self.ids = tok, out, list(prompt_ids)
        self.printed = tok.decode(self.ids)
        out.write(self.printed)

    def add(self, token_id):
        self.ids.append(token_id)
        text = self.tok.decode(self.ids)
        if text.endswith("\ufffd") or not text.startswith(self.printed):
            return
        self.out.write(text[len(self.printed):])
        self.out.flush()
        self.printed = text


def main():
    try:
        check_sampling(temperature, top_k or None, top_p)
    except ValueError as e:
        fail(f"{e}")
    if num_samples < 1 or max_new_tokens < 1:
        fail(f"num_samples={num_samples} and max_new_tokens={max_new_tokens} must both be >= 1")
    dev, ctx = inference_device(device, dtype)
    if adapter:
        from lora import load_with_adapter
        model, ckpt, _ = load_with_adapter(checkpoint, adapter, dev)
    else:
        model, ckpt = load_model(checkpoint, dev)
    tok = tokenizer_for(ckpt, tokenizer, model.args.vocab_size)

    gen = torch.Generator(device=dev).manual_seed(seed)
    if chat or interactive:
        return chat_main(model, tok, gen, ctx, dev)
    text = prompt
    if prompt_file:
        try:
            with open(prompt_file, encoding="utf-8") as f:
                text = f.read()
        except OSError as e:
            fail(f"cannot read prompt_file '{prompt_file}' ({e.strerror}); check the path")
    ids = tok.encode(text, bos=True)
    if len(ids) >= model.args.max_seq_len:
        fail(f"prompt is {len(ids)} tokens but the model's context is {model.args.max_seq_len}; "
             f"shorten the prompt to leave room for new tokens")

    x = torch.tensor([ids], dtype=torch.long, device=dev)
    for i in range(num_samples):
        printer = StreamPrinter(tok, ids) if stream else None
        on_token = (lambda t: printer.add(int(t[0]))) if stream else None
        with ctx:
            y = model.generate(x, max_new_tokens, temperature=temperature, top_k=top_k or None, top_p=top_p,
                               eos_id=tok.eos_id, generator=gen, on_token=on_token)
        new = y[0, len(ids):].tolist()
        if tok.eos_id in new:
            new = new[:new.index(tok.eos_id)]
        if not stream:
            sys.stdout.write(tok.decode(ids + new))
        sys.stdout.write("\n" + ("---------------\n" if i < num_samples - 1 else ""))
        sys.stdout.flush()


def chat_reply(model, tok, history, gen, ctx, dev):
    """Generate the assistant's next answer to history (a list of messages) up to <|end_of_turn|>,
    streaming it; returns its text. The oldest user/assistant pairs are dropped (from history itself)
    while the rendered conversation plus max_new_tokens would overflow the context."""
    from chat import chat_ids, render_chat
    eot = chat_ids(tok)[2]
    ids = render_chat(tok, history, add_generation_prompt=True)[0]
    while len(ids) + max_new_tokens > model.args.max_seq_len and len(history) > 1:
        del history[:2]
        ids = render_chat(tok, history, add_generation_prompt=True)[0]
        print(f"(dropped the oldest turn to fit the {model.args.max_seq_len}-token context)", file=sys.stderr)
    if len(ids) >= model.args.max_seq_len:
        fail(f"the message is {len(ids)} tokens but the model's context is {model.args.max_seq_len}; shorten it")
    printer = StreamPrinter(tok, []) if stream else None  # the answer only, not the rendered prompt
    new = []

    def on_token(t):
        new.append(int(t[0]))
        if printer is not None and new[-1] != eot:
            printer.add(new[-1])
    with ctx:
        model.generate(torch.tensor([ids], device=dev), max_new_tokens, temperature=temperature, top_k=top_k or None,
                       top_p=top_p, eos_id=eot, generator=gen, on_token=on_token)
    answer = tok.decode(new[:new.index(eot)] if eot in new else new)
    sys.stdout.write(("" if stream else answer) + "\n")
    sys.stdout.flush()
    return answer


def chat_main(model, tok, gen, ctx, dev):
    if not interactive:
        text = open(prompt_file, encoding="utf-8").read() if prompt_file else prompt
        for i in range(num_samples):
            chat_reply(model, tok, [{"role": "user", "content": text}], gen, ctx, dev)
            if i < num_samples - 1:
                sys.stdout.write("---------------\n")
        return
    history = []
    for line in sys.stdin:  # one user message per line; EOF ends the chat
        if line.strip():
            history.append({"role": "user", "content": line.strip()})
            history.append({"role": "assistant", "content": chat_reply(model, tok, history, gen, ctx, dev)})


if __name__ == "__main__":
    main()

"""Text in, text out: generation on top of model.generate that scripts share (train.py's samples, and the
serving engine that batches requests builds on it)."""
import torch


def complete(model, tok, prompt, max_new_tokens, temperature=0.8, top_k=None, top_p=None, generator=None,
             stop_ids=None):
    """The text the model writes after prompt, up to max_new_tokens or a stop id (default: the tokenizer's
    EOS). The prompt is encoded with BOS and cut from the left to leave room for at least one new token; the
    answer is decoded in context, so its first space survives."""
    ids = tok.encode(prompt, bos=True)[-(model.args.max_seq_len - 1):]
    stops = [tok.eos_id] if stop_ids is None else list(stop_ids)
    device = model.tok_embeddings.weight.device
    y = model.generate(torch.tensor([ids], device=device), max_new_tokens, temperature=temperature, top_k=top_k,
                       top_p=top_p, eos_id=stops, generator=generator)[0].tolist()
    new = y[len(ids):]
    cut = next((i for i, t in enumerate(new) if t in stops), len(new))
    return tok.decode(ids + new[:cut])[len(tok.decode(ids)):]

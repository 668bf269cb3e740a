"""`python -m jaxdec.tools.explain`: one HTML page that shows what a model attends to and what the KV cache saves.

    python -m jaxdec.tools.explain --checkpoint runs/stdlib/checkpoints --out runs/stdlib/explain
    python -m jaxdec.tools.explain --checkpoint runs/dates/checkpoints --out runs/dates/explain
    python -m jaxdec.tools.explain --task dates --out runs/explain-dates   # a small random model

The page (`report.html`, every image embedded, so the file alone is the report) and its PNGs:
- `causal_mask.png`: the causal mask of "[SOS] 나는 학교에 간다" over its byte tokens;
  `padding_mask.png` and `padded_causal_mask.png`: a batch of unequal lengths, padded.
- `self_attention_layer{i}.png` (and, for an encoder-decoder, `encoder_attention_layer{i}.png`,
  `cross_attention_layer{i}.png`): every head's probabilities from `jaxdec.inspect.attention`.
- `decode_cost.png`: per generated step, query rows, counted FLOPs and measured time of the
  uncached path (a full forward over the growing prefix) and the cached path (one query row).

The tokenizer is bytes, so a Hangul syllable is three tokens: axes label each byte and group
the bytes of one character under it. Text is drawn with NanumGothic, which the
`koreanize-matplotlib` wheel ships (a project dependency): nothing is downloaded at run time.

Modules: `__main__` (the command line), `loading` (a checkpoint's or a random model),
`report` (the page's sections and `explain()`, which writes it), `decode_cost` (counting and
timing greedy decoding both ways), `stepping` (the cached decoder stepped from Python, each call
timed), `text` (the sentences shown and byte tokens as labels), `fonts` (the Hangul font),
`plots` (the figures), `page` (the HTML writer).
"""

"""Export a directory written by `qcompile quantize` to ONNX and generate with onnxruntime-genai.

    python examples/export_generate.py out/smollm2-quarot-w4a8 out/smollm2-quarot-w4a8-onnx
"""

import sys

import onnxruntime_genai as og

from qcompile.export import export_onnx

saved, out = sys.argv[1], sys.argv[2]
folder = export_onnx(saved, out, force=True)  # model.onnx (+ data), genai_config.json, tokenizer files

model = og.Model(str(folder))
tokenizer = og.Tokenizer(model)
params = og.GeneratorParams(model)
params.set_search_options(do_sample=False, max_length=64)
generator = og.Generator(model, params)
generator.append_tokens(tokenizer.encode("The capital of France is"))
while not generator.is_done():
    generator.generate_next_token()
print(tokenizer.decode(generator.get_sequence(0)))

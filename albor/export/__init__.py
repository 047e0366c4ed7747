"""Taking a trained model elsewhere: which model file, which tokenizer, and the files another tool reads.

:mod:`albor.export.model_file` picks and checks the ``.apr`` (a run's best
epoch, or a file given as it is), :mod:`albor.export.run_tokenizer` finds
the tokenizer a run was trained with, and :mod:`albor.export.hf_files`
writes a Hugging Face ``LlamaForCausalLM`` directory. The command is
:mod:`albor.export_hf` (``albor export --hf``).
"""

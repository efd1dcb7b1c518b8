"""The language model side of DPO4Rec: model resolution, prompts, single-token labels, the vLLM engine.

Submodules are imported explicitly (``from llm.engine import ...``); nothing is imported here, so
``import llm`` stays cheap and never pulls in vLLM.
"""

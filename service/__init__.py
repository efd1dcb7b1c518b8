"""The online side of DPO4Rec: a FastAPI re-ranking service over a training run directory (SPEC section 7).

``service.main.create_app`` builds the app; ``service.server.serve`` runs it under uvicorn. Imports
flow one way: ``service -> {retrieval, llm}``, never ``training``.
"""

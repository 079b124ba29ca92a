"""The HTTP contracts of the two services as pydantic models: what each endpoint takes and answers.

The services declare their routes with these models (so ``/openapi.json`` describes every body),
and :mod:`lastkd.client` parses answers with the very same models, so server and client cannot
drift apart. Pydantic only: no FastAPI, no torch.
"""

"""The FastAPI service that serves boxed models: /predict for anyone, /distill-batch for licensed users."""

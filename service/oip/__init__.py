"""The Open Inference Protocol (KServe v2 / Triton REST): request decoding, answers and error shape.

The routes are in service.routes.oip; both paths run the flows every protocol shares (service.flows).
"""

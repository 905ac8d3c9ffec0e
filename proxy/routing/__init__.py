"""Routing and access policy: which route a request belongs to, who may use
it, where it goes upstream, and each route's runtime pieces.
"""

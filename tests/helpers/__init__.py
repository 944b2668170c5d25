"""What the tests share, one module a concern; test modules import from here, never from
each other, and conftest.py keeps only fixtures.

- server: RunningServer (the real Server in-process, on loopback), Clock, FROZEN_NOW, has_ipv6
- fakeupstream: an in-process upstream with scripted faults; dohserver: a DoH server with faults
- realservers: the resolver as a child process, NSD, free ports, stopping a child process
- richzones: zones of every answer shape (NSD) and Unbound as a reference forwarder
- tls: the openssl test certificate and Unbound serving DoT and DoH
- client: ask() a resolver on loopback, and DNS-over-TCP framing by hand
- cli: run the command line (check, explain, audit, healthcheck) to completion
- http: the admin API and /metrics over HTTP, checked against the OpenAPI description
- wait: poll until a condition holds; memory: resident memory from /proc
- wire: hand-made and malformed packets; policy: list files and UTC instants
- image: the container image as the Dockerfile describes it (for tests/deploy/)
"""

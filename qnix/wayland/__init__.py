"""The Wayland wire protocol and the per-compartment filter's rules, pure: no sockets here.

protocol.py reads interfaces from the protocol XML files, wire.py decodes and encodes
messages and keeps each connection's objects, rules.py decides what passes between a
compartment's clients and the compositor. The process that moves the bytes is
qnix.runtime.waylandproxy.
"""

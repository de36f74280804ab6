"""Programs that run inside compartments, standard library only.

The keeper seals every `*.py` file of this folder into a memfd and binds it read-only at
`/opt/qnix-agent/<file name>` in each compartment, next to the agent, so the broker can run
them through the agent (`python3 -I -S /opt/qnix-agent/<file>`). They see only what the
compartment sees and are written for hostile input.
"""

"""The broker: carries out what the policy allows between compartments (Qubes' qrexec daemon).

Every request goes through `qnix.broker.decide.decide`: the live generation's policy, the
compartments the host runs now, one audit event per decision.
"""

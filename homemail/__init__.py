"""homemail: a mail server for desktops and home labs, modelled on OpenSMTPD.

The package is laid out by role, as OpenSMTPD's sources are: ``smtpd`` (the daemon entry and its
lifecycle), ``smtp`` (inbound sessions), ``queue`` with its ``queue_fs`` and ``queue_ram``
backends, ``scheduler``, ``mda`` (local delivery), ``bounce`` (delivery status notifications),
``table`` and ``aliases`` (lookups and expansion), ``ruleset`` (match rules), ``address``,
``config`` and ``log``.
"""

__version__ = "0.1.0"

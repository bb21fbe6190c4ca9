"""The Fiji bridge: the only code that talks to Java (scyjava, jpype, pyimagej).

``manifest`` needs no JVM; ``bridge``, ``commands``, ``convert`` and ``launcher`` use the ImageJ1 API
(``ij.*``) so that the same code runs inside Fiji and against a plain ImageJ jar.
"""

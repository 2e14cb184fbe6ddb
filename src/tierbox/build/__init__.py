"""Images from Dockerfiles: build (buildah, offline), lint (hadolint plus tierbox's
own rules), SBOM (syft) and vulnerability scan (Debian's security suite, OSV
exports), with gates that stop a build before its image is stored.

* :mod:`tierbox.build.parse`: Dockerfiles through BuildKit's parser, stages, pragmas.
* :mod:`tierbox.build.buildah`: buildah on tierbox's private storage.
* :mod:`tierbox.build.builder`: ``tierbox image build``.
"""

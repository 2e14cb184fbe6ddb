"""Images from Dockerfiles: build (buildah, offline), lint (hadolint plus tierbox's
own rules), SBOM (syft) and vulnerability scan (Debian's security suite, OSV
exports), with gates that stop a build before its image is stored.

Built on the image store (:mod:`tierbox.images`) and the runner, never on a
tier: built images reach the tiers through the store like any other.

* :mod:`tierbox.build.parse`: Dockerfiles through BuildKit's parser; stages, ARGs, pragmas.
* :mod:`tierbox.build.buildah`: buildah on tierbox's private storage; its runtime.
* :mod:`tierbox.build.builder`: ``tierbox image build``.
* :mod:`tierbox.build.rules`, :mod:`tierbox.build.lint`: ``tierbox lint``.
* :mod:`tierbox.build.sbom`: ``tierbox image sbom`` (syft) and package inventories.
* :mod:`tierbox.build.versions`: version order per ecosystem, OSV range evaluation.
* :mod:`tierbox.build.osv`, :mod:`tierbox.build.debsec`: the two vulnerability sources.
* :mod:`tierbox.build.scan`: ``tierbox image scan``.
* :mod:`tierbox.build.gates`: ``--lint``/``--scan`` gates of ``tierbox image build``.
* :mod:`tierbox.build.sarif`, :mod:`tierbox.build.tools`: SARIF logs; hadolint and syft.
"""

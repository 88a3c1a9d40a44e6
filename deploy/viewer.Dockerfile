# The OHIF web viewer for deploy/k8s/viewer: OHIF's prebuilt files from the npm package pinned, with its
# integrity and the replacements that fix its bundles (as the demo's fetch_viewer makes them), in
# deploy/k8s/viewer/ohif.json, served by nginx-unprivileged (port 8080, user 101), which also
# proxies /dicom-web to the PACS. The Kubernetes manifest mounts app-config.js and the site template from a
# ConfigMap; the copies here make `docker run -e PACS_DICOMWEB_URL=... -p 8080:8080` work on its own.
#   docker build -f deploy/viewer.Dockerfile -t registry.example.org/sat/sat-viewer:0.1.0 .
FROM node:20-bookworm-slim AS viewer
WORKDIR /build
COPY deploy/k8s/viewer/ohif.json .
RUN node -e ' \
      const { execSync } = require("child_process"); \
      const pin = require("./ohif.json"); \
      const [packed] = JSON.parse(execSync(`npm pack ${pin.package}@${pin.version} --json`)); \
      if (packed.integrity !== pin.integrity) throw new Error(`${packed.filename}: not the pinned ${pin.package}`); \
      execSync(`tar xzf ${packed.filename} package/dist`); \
      const fs = require("fs"); \
      const bundles = fs.readdirSync("package/dist").filter(n => n.endsWith(".js")).map(n => `package/dist/${n}`); \
      for (const [find, replace] of pin.patches.replacements) { \
        const hits = bundles.filter(f => fs.readFileSync(f, "utf8").includes(find)); \
        if (!hits.length) throw new Error(`no bundle holds the patched text ${find}`); \
        for (const f of hits) fs.writeFileSync(f, fs.readFileSync(f, "utf8").split(find).join(replace)); \
      }'

FROM nginxinc/nginx-unprivileged:1.27-bookworm
COPY --from=viewer /build/package/dist /usr/share/nginx/html
COPY deploy/k8s/viewer/app-config.js /usr/share/nginx/html/app-config.js
COPY deploy/k8s/viewer/default.conf.template /etc/nginx/templates/default.conf.template
ENV PACS_DICOMWEB_URL=http://orthanc:8042/dicom-web \
    PACS_AUTHORIZATION=""

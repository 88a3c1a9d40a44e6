/** @type {AppTypes.Config} */
// The OHIF viewer's configuration for SAT's deployment (deploy/k8s/viewer; `just pacs-demo` serves it too).
//
// It has no site settings: the viewer reads DICOMweb from its own origin (/dicom-web), where its web server
// proxies the PACS (PACS_DICOMWEB_URL in the viewer's Deployment), so the browser needs no CORS, and the
// hospital's login sits in front of both (deploy/README.md, "The viewer").
window.config = {
  name: 'sat',
  routerBasename: null,
  extensions: [],
  modes: [],
  customizationService: {},
  showStudyList: true,
  maxNumberOfWebWorkers: 3,
  showWarningMessageForCrossOrigin: false,
  showCPUFallbackMessage: true,
  showLoadingIndicator: true,
  strictZSpacingForVolumeViewport: true,
  // A SEG or RT Structure Set opened from the study loads over its series without a question first.
  disableConfirmationPrompts: true,
  maxNumRequests: { interaction: 100, thumbnail: 5, prefetch: 25 },
  showErrorDetails: 'always',
  defaultDataSourceName: 'pacs',
  dataSources: [
    {
      namespace: '@ohif/extension-default.dataSourcesModule.dicomweb',
      sourceName: 'pacs',
      configuration: {
        friendlyName: 'PACS (DICOMweb)',
        name: 'pacs',
        wadoUriRoot: '/dicom-web',
        qidoRoot: '/dicom-web',
        wadoRoot: '/dicom-web',
        qidoSupportsIncludeField: false,
        imageRendering: 'wadors',
        thumbnailRendering: 'wadors',
        enableStudyLazyLoad: true,
        supportsFuzzyMatching: false,
        supportsWildcard: true,
        staticWado: false,
        singlepart: 'bulkdata,video',
        bulkDataURI: { enabled: true, relativeResolution: 'studies' },
        omitQuotationForMultipartRequest: true,
      },
    },
  ],
};

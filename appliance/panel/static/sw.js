// The panel's service worker, served at /sw.js (scope: the whole panel). The panel fills
// in the two values below when it serves this file (appliance/panel/routes/app_shell.py):
// the version changes with any file of the shell, so a new release installs a new worker,
// which replaces the old cache.
//
// It keeps only the offline shell (a public page and the files it loads, fetched without
// cookies), never a page or an API answer: those come from the box or not at all. A page
// the box does not answer (it is off, or the phone is away) shows the offline page, which
// loads the page again once the box is back.
"use strict";
var VERSION = "{{ version }}";
var SHELL = {{ shell }};
var OFFLINE = "/offline";

self.addEventListener("install", function (event) {
  event.waitUntil(caches.open(VERSION).then(function (cache) {
    return cache.addAll(SHELL.map(function (url) {
      return new Request(url, {cache: "reload", credentials: "omit"});
    }));
  }).then(function () { return self.skipWaiting(); }));
});

self.addEventListener("activate", function (event) {
  event.waitUntil(caches.keys().then(function (names) {
    return Promise.all(names.filter(function (name) { return name !== VERSION; })
                            .map(function (name) { return caches.delete(name); }));
  }).then(function () { return self.clients.claim(); }));
});

function cached(url) {
  return caches.open(VERSION).then(function (cache) { return cache.match(url); })
    .then(function (answer) { return answer || Response.error(); });
}

self.addEventListener("fetch", function (event) {
  var request = event.request;
  var url = new URL(request.url);
  if (request.method !== "GET" || url.origin !== self.location.origin) {
    return;  // a form, a stream, another site: the browser as usual
  }
  if (request.mode === "navigate") {
    event.respondWith(fetch(request).catch(function () { return cached(OFFLINE); }));
  } else if (!url.search && SHELL.indexOf(url.pathname) !== -1) {
    event.respondWith(fetch(request).catch(function () { return cached(url.pathname); }));
  }
});

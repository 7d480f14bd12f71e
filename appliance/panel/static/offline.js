// The offline page: ask the box every few seconds whether it answers again, and when it
// does, load the page that was wanted (the address bar still shows it; /offline itself
// leads to the dashboard). "Try again" asks at once.
(function () {
  "use strict";
  var EVERY_MS = 3000;
  var timer = null;

  function back() {
    location.replace(location.pathname === "/offline" ? "/" : location.href);
  }

  function later() {
    clearTimeout(timer);
    timer = setTimeout(check, EVERY_MS);
  }

  function check() {
    // HEAD: the service worker lets it through to the box (it keeps only GET answers).
    fetch("/offline", {method: "HEAD", cache: "no-store"}).then(function (answer) {
      if (answer.ok) { back(); } else { later(); }
    }, later);
  }

  document.addEventListener("DOMContentLoaded", function () {
    var retry = document.getElementById("retry");
    if (retry) {
      retry.addEventListener("click", function (event) {
        event.preventDefault();
        check();
      });
    }
    later();
  });
})();

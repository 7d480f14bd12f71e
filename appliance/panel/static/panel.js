// Live parts: an element with data-live="/live/<part>" is replaced by each HTML fragment
// the server streams (Server-Sent Events). The page works without this script.
(function () {
  "use strict";
  function follow(el) {
    var source = new EventSource(el.getAttribute("data-live"));
    var part = el.getAttribute("data-live").split("/").pop();
    source.addEventListener(part, function (event) {
      el.innerHTML = event.data;
      el.removeAttribute("data-stale");
    });
    source.onerror = function () { el.setAttribute("data-stale", "true"); };
  }
  document.addEventListener("DOMContentLoaded", function () {
    document.querySelectorAll("[data-live]").forEach(follow);
  });
})();

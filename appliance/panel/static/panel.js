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
  // A log list (data-tail="/logs/live?…") gets each new line on top while its "Live"
  // button (data-tail-toggle, hidden without this script) is pressed.
  function tail(button) {
    var list = document.getElementById(button.getAttribute("aria-controls"));
    var source = null;
    button.hidden = false;
    button.addEventListener("click", function () {
      if (source) { source.close(); source = null; list.removeAttribute("data-following"); }
      else {
        source = new EventSource(list.getAttribute("data-tail"));
        source.addEventListener("ready", function () {
          list.setAttribute("data-following", "");
          list.removeAttribute("data-stale");
        });
        source.addEventListener("line", function (event) {
          var empty = list.querySelector(".empty");
          if (empty) { empty.remove(); }
          list.insertAdjacentHTML("afterbegin", event.data);
          while (list.children.length > 1000) { list.lastElementChild.remove(); }
          list.removeAttribute("data-stale");
        });
        source.onerror = function () { list.setAttribute("data-stale", "true"); };
      }
      button.setAttribute("aria-pressed", source ? "true" : "false");
    });
  }
  document.addEventListener("DOMContentLoaded", function () {
    document.querySelectorAll("[data-live]").forEach(follow);
    document.querySelectorAll("[data-tail-toggle]").forEach(tail);
  });
  // The installable app's service worker (/sw.js): the offline page when the box is
  // unreachable. Browsers offer it on HTTPS and on localhost only.
  if ("serviceWorker" in navigator) {
    window.addEventListener("load", function () {
      navigator.serviceWorker.register("/sw.js").catch(function (error) {
        console.warn("service worker not registered:", error);
      });
    });
  }
})();

// The Files page's upload with a progress bar: the form (#upload) goes to the API by
// XMLHttpRequest, whose upload progress moves the bar; the list is then fetched again.
// Without this script the form posts as it is and the page comes back.
(function () {
  "use strict";
  function detail(xhr) {
    try {
      var body = JSON.parse(xhr.responseText);
      return typeof body.detail === "string" ? body.detail : "the box refused it (" + xhr.status + ")";
    } catch (e) {
      return "the box answered " + xhr.status;
    }
  }
  function folderOf(path) {
    var cut = path.lastIndexOf("/");
    return cut < 0 ? "" : path.slice(0, cut + 1);
  }
  // The list as the box now has it, in place of the one shown.
  function refresh(folder) {
    return fetch("/files?folder=" + encodeURIComponent(folder), {credentials: "same-origin"})
      .then(function (answer) { return answer.text(); })
      .then(function (html) {
        var fresh = new DOMParser().parseFromString(html, "text/html").getElementById("file-list");
        if (fresh) { document.getElementById("file-list").innerHTML = fresh.innerHTML; }
      });
  }
  function enhance(form) {
    var bar = document.getElementById("upload-progress");
    var status = document.getElementById("upload-status");
    var button = document.getElementById("upload-button");
    var input = form.querySelector("input[type=file]");
    var max = Number(form.getAttribute("data-max-bytes")) || 0;
    var here = form.getAttribute("data-folder");  // the folder shown, "" or "a/b/"
    function say(text, bad) {
      status.textContent = text;
      status.className = bad ? "error" : "";
    }
    form.addEventListener("submit", function (event) {
      var file = input.files && input.files[0];
      if (!file) { return; }  // the browser's own "required" speaks
      event.preventDefault();
      if (max && file.size > max) {
        say("Not uploaded: " + file.name + " is larger than this box takes.", true);
        return;
      }
      var xhr = new XMLHttpRequest();
      xhr.open("POST", form.getAttribute("data-api"));
      xhr.setRequestHeader("X-CSRF-Token", form.elements.csrf.value);
      xhr.setRequestHeader("Accept", "application/json");
      bar.max = file.size || 1;
      bar.value = 0;
      bar.hidden = false;
      button.disabled = true;
      say("Uploading " + file.name + "…", false);
      xhr.upload.onprogress = function (e) {
        if (e.lengthComputable) { bar.max = e.total; bar.value = e.loaded; }
      };
      xhr.onload = function () {
        button.disabled = false;
        if (xhr.status !== 201) {
          say("Not uploaded: " + detail(xhr), true);
          return;
        }
        var made = JSON.parse(xhr.responseText);
        bar.value = bar.max;
        input.value = "";
        say("Uploaded " + made.path + ".", false);
        var folder = folderOf(made.path);
        if (folder === here) {
          refresh(folder).catch(function () { window.location.reload(); });
        } else {
          window.location.assign("/files?folder=" + encodeURIComponent(folder));
        }
      };
      xhr.onerror = function () {
        button.disabled = false;
        say("Not uploaded: the box did not answer.", true);
      };
      xhr.send(new FormData(form));
    });
  }
  document.addEventListener("DOMContentLoaded", function () {
    var form = document.getElementById("upload");
    if (form && window.FormData && window.XMLHttpRequest) { enhance(form); }
  });
})();

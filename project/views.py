"""Demo pages: a home page and a registration form that fires mailer's signal."""

from django import forms
from django.contrib.auth import login
from django.contrib.auth.forms import BaseUserCreationForm
from django.contrib.auth.models import User
from django.db import transaction
from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect, render

from mailer.signals import user_registered


class RegistrationForm(BaseUserCreationForm):
    email = forms.EmailField(required=True)

    class Meta(BaseUserCreationForm.Meta):
        model = User
        fields = ("username", "email")

    def clean_email(self) -> str:
        email = self.cleaned_data["email"].strip().lower()
        if User.objects.filter(email__iexact=email).exists():
            raise forms.ValidationError("An account with this email already exists.")
        return email


def home(request: HttpRequest) -> HttpResponse:
    return render(request, "home.html")


def register(request: HttpRequest) -> HttpResponse:
    form = RegistrationForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        with transaction.atomic():
            user = form.save()
            # The emails are queued in this transaction and leave once it commits.
            user_registered.send(sender=User, user=user, request=request)
        login(request, user, backend="django.contrib.auth.backends.ModelBackend")
        return redirect("home")
    return render(request, "registration/register.html", {"form": form})
